//! Gateway metrics (one registry per app): HTTP requests and latency by route, tasks
//! submitted and finished, queue length, WebSocket clients, and the stage backlog read
//! from consumer info on scrape (at most every 2 s).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lipsync_schemas::{Stage, TaskRecord, names};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::AppState;

/// Backlog figures are refreshed at most this often.
const BACKLOG_REFRESH: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct GatewayMetrics {
    pub(crate) registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    pub(crate) submitted: IntCounter,
    finished: IntCounterVec,
    /// Submit-to-completed wall time per second of output (the audio's length).
    e2e_per_output_second: Histogram,
    queue_length: IntGauge,
    pub(crate) ws_clients: IntGauge,
    /// Direct-upload URLs issued (`POST /uploads`).
    pub(crate) uploads_issued: IntCounter,
    /// Retention sweep rounds of the s3 backend, by outcome (`ok`, `error`).
    pub(crate) sweeps: IntCounterVec,
    /// Objects the retention sweep deleted.
    pub(crate) swept: IntCounter,
    backlog: IntGaugeVec,
    backlog_at: std::sync::Arc<Mutex<Option<Instant>>>,
    /// Epoch seconds this process started: tasks that ended before it are history (the
    /// start-up replay of the task index delivers them) and are not counted again.
    started_at: f64,
    /// Tasks already counted, so a later write to a terminal record counts nothing.
    counted: std::sync::Arc<Mutex<std::collections::HashSet<String>>>,
}

impl GatewayMetrics {
    pub(crate) fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "lipsync_http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "code"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "lipsync_http_request_duration_seconds",
                "HTTP request latency",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                60.0,
            ]),
            &["route"],
        )?;
        let submitted = IntCounter::new("lipsync_tasks_submitted_total", "Tasks accepted")?;
        let finished = IntCounterVec::new(
            Opts::new(
                "lipsync_tasks_finished_total",
                "Tasks seen ending by this gateway, by outcome (completed or the error code)",
            ),
            &["outcome"],
        )?;
        let e2e_per_output_second = Histogram::with_opts(
            HistogramOpts::new(
                "lipsync_task_seconds_per_output_second",
                "Submit-to-completed wall time of a completed task per second of output",
            )
            .buckets(vec![
                0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0, 128.0,
            ]),
        )?;
        let queue_length = IntGauge::new(
            "lipsync_queue_length",
            "Tasks that have not reached the GPU yet",
        )?;
        let ws_clients = IntGauge::new("lipsync_websocket_clients", "Open WebSocket connections")?;
        let uploads_issued = IntCounter::new(
            "lipsync_uploads_issued_total",
            "Direct-upload URLs issued by POST /uploads",
        )?;
        let sweeps = IntCounterVec::new(
            Opts::new(
                "lipsync_artifact_sweeps_total",
                "Retention sweep rounds of the s3 artifact backend, by outcome (ok, error)",
            ),
            &["outcome"],
        )?;
        let swept = IntCounter::new(
            "lipsync_artifact_swept_objects_total",
            "Objects older than artifacts.ttl_s that the retention sweep deleted",
        )?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                "lipsync_stage_backlog",
                "Work items waiting or in flight per stage (consumer pending + ack pending)",
            ),
            &["stage"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(submitted.clone()))?;
        registry.register(Box::new(finished.clone()))?;
        registry.register(Box::new(e2e_per_output_second.clone()))?;
        registry.register(Box::new(queue_length.clone()))?;
        registry.register(Box::new(ws_clients.clone()))?;
        registry.register(Box::new(uploads_issued.clone()))?;
        registry.register(Box::new(sweeps.clone()))?;
        registry.register(Box::new(swept.clone()))?;
        registry.register(Box::new(backlog.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            submitted,
            finished,
            e2e_per_output_second,
            queue_length,
            ws_clients,
            uploads_issued,
            sweeps,
            swept,
            backlog,
            backlog_at: Default::default(),
            started_at: lipsync_runtime::tasks::now().0,
            counted: Default::default(),
        })
    }

    /// Count a task ending (called for every applied change of the watch, the start-up
    /// replay included): only tasks that ended while this process runs, each once.
    pub(crate) fn observe_record(&self, rec: &TaskRecord) {
        if !rec.status.is_terminal() || !rec.end_time.is_some_and(|t| t >= self.started_at) {
            return;
        }
        {
            let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
            if !counted.insert(rec.task_id.clone()) {
                return;
            }
            if counted.len() > 100_000 {
                counted.clear();
            }
        }
        let outcome = match &rec.error {
            None => "completed",
            Some(e) => e.code.as_str(),
        };
        self.finished.with_label_values(&[outcome]).inc();
        let output_s = rec.media.as_ref().map_or(0.0, |m| m.audio_duration_s);
        if rec.error.is_none()
            && output_s > 0.0
            && let Some(end) = rec.end_time
        {
            self.e2e_per_output_second
                .observe((end - rec.start_time).max(0.0) / output_s);
        }
    }
}

/// The `method` label: the methods the API knows, every other method as `other` (a
/// client sending random methods must not grow the series without bound; the route label
/// is bounded by the routes, `unmatched` for the rest).
pub(crate) fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Records every request's route, method, status and latency.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method()).to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.http_requests
        .with_label_values(&[route.as_str(), method.as_str(), resp.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn refresh_backlog(state: &AppState) {
    {
        let mut at = state
            .metrics
            .backlog_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at.is_some_and(|t| t.elapsed() < BACKLOG_REFRESH) {
            return;
        }
        *at = Some(Instant::now());
    }
    let Ok(stream) = state.js.get_stream(names::WORK_STREAM).await else {
        return;
    };
    for stage in Stage::ALL {
        let n = match stream.consumer_info(names::consumer_name(stage)).await {
            Ok(info) => (info.num_pending + info.num_ack_pending as u64) as i64,
            Err(_) => {
                // No consumer yet: count the stage's messages in the stream.
                let subject = names::work_subject(stage);
                match stream.info_with_subjects(subject.as_str()).await {
                    Ok(mut infos) => {
                        use futures::TryStreamExt;
                        let mut total = 0i64;
                        while let Ok(Some((_, count))) = infos.try_next().await {
                            total += count as i64;
                        }
                        total
                    }
                    Err(_) => continue,
                }
            }
        };
        state
            .metrics
            .backlog
            .with_label_values(&[stage.as_str()])
            .set(n);
    }
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .queue_length
        .set(state.index.queue_length() as i64);
    refresh_backlog(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        lipsync_runtime::metrics::render(&state.metrics.registry),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lipsync_schemas::{InputSource, Status, TaskRequest};

    fn finished(id: &str, end_time: f64) -> TaskRecord {
        let mut rec = TaskRecord::new(
            id.into(),
            TaskRequest {
                video: InputSource::Url("http://x/v".into()),
                audio: InputSource::Url("http://x/a".into()),
                model: "tiny".into(),
                inference_steps: 1,
                guidance_scale: 1.0,
                seed: None,
                webhook_url: None,
                output_upload_url: None,
            },
            end_time - 1.0,
            String::new(),
        );
        rec.status = Status::Completed;
        rec.end_time = Some(end_time);
        rec
    }

    #[test]
    fn finished_counts_only_tasks_ending_after_start_and_each_once() {
        let m = GatewayMetrics::new().unwrap();
        let completed = || m.finished.with_label_values(&["completed"]).get();
        // The start-up replay delivers tasks that ended before this process started.
        m.observe_record(&finished("old", m.started_at - 3600.0));
        assert_eq!(completed(), 0);
        let new = finished("new", m.started_at + 1.0);
        m.observe_record(&new);
        assert_eq!(completed(), 1);
        assert_eq!(
            m.e2e_per_output_second.get_sample_count(),
            0,
            "no media summary"
        );
        let mut timed = finished("timed", m.started_at + 10.0);
        timed.start_time = timed.end_time.unwrap() - 6.0;
        timed.media = Some(lipsync_schemas::MediaSummary {
            width: 640,
            height: 480,
            fps: 25.0,
            video_duration_s: 3.0,
            audio_duration_s: 3.0,
            video_stream: None,
        });
        m.observe_record(&timed);
        assert_eq!(completed(), 2);
        assert_eq!(m.e2e_per_output_second.get_sample_count(), 1);
        assert!((m.e2e_per_output_second.get_sample_sum() - 2.0).abs() < 1e-9);
        // A later write to the same terminal record (or a replay after a watch restart).
        m.observe_record(&new);
        assert_eq!(completed(), 2);
    }
}
