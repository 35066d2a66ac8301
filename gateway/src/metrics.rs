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
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
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
    queue_length: IntGauge,
    pub(crate) ws_clients: IntGauge,
    backlog: IntGaugeVec,
    backlog_at: std::sync::Arc<Mutex<Option<Instant>>>,
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
        let queue_length = IntGauge::new(
            "lipsync_queue_length",
            "Tasks that have not reached the GPU yet",
        )?;
        let ws_clients = IntGauge::new("lipsync_websocket_clients", "Open WebSocket connections")?;
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
        registry.register(Box::new(queue_length.clone()))?;
        registry.register(Box::new(ws_clients.clone()))?;
        registry.register(Box::new(backlog.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            submitted,
            finished,
            queue_length,
            ws_clients,
            backlog,
            backlog_at: Default::default(),
        })
    }

    /// Count a task ending (called once per applied terminal change of the watch).
    pub(crate) fn observe_record(&self, rec: &TaskRecord) {
        if !rec.status.is_terminal() {
            return;
        }
        let outcome = match &rec.error {
            None => "completed",
            Some(e) => e.code.as_str(),
        };
        self.finished.with_label_values(&[outcome]).inc();
    }
}

/// Records every request's route, method, status and latency.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
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
