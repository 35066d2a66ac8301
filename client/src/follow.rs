//! Following a task to its end: the WebSocket `GET /task/{id}/ws` (the current record at
//! once, then its changes in order, closed after a terminal state), with polling of
//! `GET /task/{id}` as the fallback when the socket cannot be opened or drops (a proxy
//! without WebSocket support, a gateway restart). Every update drives a [`Progress`].

use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::api::{Client, Task};
use crate::error::{ClientError, Result};

/// Consecutive WebSocket failures after which the client only polls.
const WS_MAX_FAILURES: u32 = 3;
/// Poll interval when the WebSocket is not used.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Follows task `id` until it is completed or failed, calling `on_update` for every
/// record seen (in order; duplicates possible after a reconnect). Returns the last one.
///
/// # Errors
/// The task cannot be read (unknown id, server unreachable for good).
pub async fn follow(client: &Client, id: &str, mut on_update: impl FnMut(&Task)) -> Result<Task> {
    let mut ws_failures = 0u32;
    let mut poll_errors = 0u32;
    loop {
        if ws_failures < WS_MAX_FAILURES {
            match follow_ws(client, id, &mut on_update).await {
                Ok(Some(done)) => return Ok(done),
                // Closed before the end (server shutting down): poll, then reconnect.
                Ok(None) => ws_failures = 0,
                Err(_) => ws_failures += 1,
            }
        }
        match client.task(id).await {
            Ok(task) => {
                poll_errors = 0;
                on_update(&task);
                if task.is_terminal() {
                    return Ok(task);
                }
            }
            Err(e @ ClientError::Api { status: 404, .. }) => return Err(e),
            // The server may be restarting: keep trying for a while.
            Err(e) if poll_errors >= 30 => return Err(e),
            Err(_) => poll_errors += 1,
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One WebSocket session: `Ok(Some(task))` at a terminal record, `Ok(None)` if the server
/// closed first, `Err` if the socket could not be opened or broke.
async fn follow_ws(
    client: &Client,
    id: &str,
    on_update: &mut impl FnMut(&Task),
) -> Result<Option<Task>> {
    crate::install_crypto_provider();
    let mut url = client.url(&format!("/task/{id}/ws"))?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme)
        .map_err(|_| ClientError::Protocol("cannot build the websocket url".into()))?;
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let Some(key) = client.api_key() {
        let v = format!("Bearer {key}")
            .parse()
            .map_err(|_| ClientError::Usage("--api-key must be visible ASCII".into()))?;
        req.headers_mut().insert("authorization", v);
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| ClientError::Protocol(format!("websocket: {e}")))?;
    while let Some(msg) = socket.next().await {
        let msg = msg.map_err(|e| ClientError::Protocol(format!("websocket: {e}")))?;
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return Ok(None),
            _ => continue,
        };
        let value: serde_json::Value = serde_json::from_str(text.as_str())
            .map_err(|e| ClientError::Protocol(format!("websocket message: {e}")))?;
        let task = Task::from_value(value)?;
        on_update(&task);
        if task.is_terminal() {
            let _ = socket.close(None).await;
            return Ok(Some(task));
        }
    }
    Ok(None)
}

/// The live progress display: a bar over the task's 0-1 progress with the stage, the
/// server's message and an ETA. Hidden when stderr is not a terminal.
pub struct Progress {
    bar: ProgressBar,
    /// Shown before the stage (the short task id when several tasks are followed).
    label: Option<String>,
    /// When progress first moved above zero, and from where (for the ETA).
    started: Option<(Instant, f64)>,
    last_warning_count: usize,
}

impl Progress {
    /// A progress display drawing on stderr (hidden if `quiet` or not a terminal).
    pub fn new(quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(1000)
        };
        Self::with_bar(bar, None)
    }

    /// One bar of several (one per task), labelled with `label`, drawn by `multi`.
    pub fn in_multi(multi: &MultiProgress, quiet: bool, label: String) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            multi.add(ProgressBar::new(1000))
        };
        Self::with_bar(bar, Some(label))
    }

    fn with_bar(bar: ProgressBar, label: Option<String>) -> Self {
        let template = if label.is_some() {
            "{spinner} {prefix:<19} [{bar:24}] {percent:>3}% {elapsed_precise} {wide_msg}"
        } else {
            "{spinner} {prefix:<10} [{bar:30}] {percent:>3}% {elapsed_precise} {wide_msg}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        if let Some(l) = &label {
            bar.set_prefix(l.clone());
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            bar,
            label,
            started: None,
            last_warning_count: 0,
        }
    }

    /// Shows `task`.
    pub fn update(&mut self, task: &Task) {
        let v = &task.view;
        let p = v.progress.clamp(0.0, 1.0);
        for w in v.warnings.iter().skip(self.last_warning_count) {
            self.bar.println(format!("warning: {w}"));
        }
        self.last_warning_count = self.last_warning_count.max(v.warnings.len());
        let prefix = match (v.status.as_str(), &v.stage) {
            ("processing", Some(stage)) => stage.clone(),
            (status, _) => status.to_owned(),
        };
        let prefix = match &self.label {
            Some(l) => format!("{l} {prefix}"),
            None => prefix,
        };
        self.bar.set_prefix(prefix);
        self.bar.set_position((p * 1000.0).round() as u64);
        let mut msg = v.message.clone();
        if v.status == "queued"
            && let Some(pos) = v.queue_position
        {
            msg = format!("{msg} (position {pos})");
        }
        if let Some(eta) = self.eta(p) {
            msg = format!("{msg} · ETA {}", format_duration(eta));
        }
        self.bar.set_message(msg);
    }

    /// Estimated time left: elapsed since progress began × remaining / done.
    fn eta(&mut self, p: f64) -> Option<Duration> {
        if p <= 0.0 || p >= 1.0 {
            return None;
        }
        let (t0, p0) = *self.started.get_or_insert((Instant::now(), p));
        let done = p - p0;
        let elapsed = t0.elapsed().as_secs_f64();
        if done < 0.01 || elapsed < 1.0 {
            return None;
        }
        Some(Duration::from_secs_f64(elapsed * (1.0 - p) / done))
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: impl AsRef<str>) {
        self.bar.println(line.as_ref());
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Stops the bar and leaves it drawn with `msg` (several tasks: the finished ones
    /// stay visible above the running ones).
    pub fn finish_with(&self, msg: String) {
        self.bar.abandon_with_message(msg);
    }
}

/// `1h 02m`, `3m 20s`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A byte-count bar for uploads and downloads (hidden if `quiet` or not a terminal).
pub fn bytes_bar(quiet: bool, what: &'static str) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:<10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(200)), "3m 20s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h 02m");
    }
}
