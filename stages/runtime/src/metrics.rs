//! Prometheus metrics. Every series carries the `lipsync_` prefix and a `stage` label.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Standard per-stage job metrics, registered once per process.
#[derive(Clone)]
pub struct StageMetrics {
    /// Jobs whose handling began.
    pub jobs_started: IntCounterVec,
    /// Jobs finished successfully.
    pub jobs_succeeded: IntCounterVec,
    /// Jobs that failed the task, by error code.
    pub jobs_failed: IntCounterVec,
    /// Deliveries that were redeliveries (delivered > 1).
    pub jobs_redelivered: IntCounterVec,
    /// Jobs NAKed for a later retry.
    pub jobs_retried: IntCounterVec,
    /// Handling time of a job in seconds.
    pub job_duration: HistogramVec,
    /// Jobs being handled now.
    pub in_flight: IntGaugeVec,
    /// Lifecycle events: `stalled`, `panicked`, `undecodable`, `reaped`, `republished`,
    /// `duplicate`, `connection_lost`.
    pub job_events: IntCounterVec,
}

impl StageMetrics {
    /// Create and register the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let jobs_started = counter("lipsync_jobs_started_total", "Jobs started", &["stage"])?;
        let jobs_succeeded = counter(
            "lipsync_jobs_succeeded_total",
            "Jobs finished successfully",
            &["stage"],
        )?;
        let jobs_failed = counter(
            "lipsync_jobs_failed_total",
            "Jobs that failed their task, by error code",
            &["stage", "code"],
        )?;
        let jobs_redelivered = counter(
            "lipsync_jobs_redelivered_total",
            "Job deliveries that were redeliveries",
            &["stage"],
        )?;
        let jobs_retried = counter(
            "lipsync_jobs_retried_total",
            "Jobs NAKed for a later retry after a transient error",
            &["stage"],
        )?;
        let job_duration = HistogramVec::new(
            HistogramOpts::new("lipsync_job_duration_seconds", "Job handling time").buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
            &["stage"],
        )?;
        registry.register(Box::new(job_duration.clone()))?;
        let in_flight = IntGaugeVec::new(
            Opts::new("lipsync_jobs_in_flight", "Jobs being handled now"),
            &["stage"],
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        let job_events = counter(
            "lipsync_job_events_total",
            "Job lifecycle events (stalled, panicked, undecodable, reaped, republished, duplicate, connection_lost)",
            &["stage", "event"],
        )?;
        Ok(Self {
            jobs_started,
            jobs_succeeded,
            jobs_failed,
            jobs_redelivered,
            jobs_retried,
            job_duration,
            in_flight,
            job_events,
        })
    }
}

/// Render a registry, plus the process-wide default registry (where stage-specific
/// metrics such as the infer stage's are registered), in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    let mut families = registry.gather();
    families.extend(prometheus::gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    if encoder.encode(&families, &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}
