//! Infer-specific metrics (docs/operations.md): seconds of work per output second, denoising
//! steps per second of the running job, and seconds the GPU worker was not inside a model
//! run (`1 - rate(lipsync_infer_idle_seconds_total)` is the duty cycle).
//!
//! They live in the process's default Prometheus registry; the stage runner's `/metrics`
//! serves its own registry, so they appear there once the runtime also gathers the
//! default registry.

use std::sync::OnceLock;

use prometheus::{CounterVec, GaugeVec, HistogramOpts, HistogramVec, Opts};

/// The infer metrics.
pub struct InferMetrics {
    /// Wall seconds per second of output video, per job.
    pub seconds_per_output_second: HistogramVec,
    /// Denoising steps per second of the running job (0 when idle).
    pub steps_per_second: GaugeVec,
    /// Seconds the GPU worker spent outside model runs (between and inside jobs).
    pub idle_seconds: CounterVec,
    /// 1 for the execution provider in use, with the model profile and whether its weights
    /// are real (alerts: a real profile on `cpu`, the `tiny` profile serving).
    pub provider: GaugeVec,
}

/// Publishes `lipsync_infer_provider{provider, profile, real} 1` (only that series).
pub fn set_provider(info: &crate::engine::ProviderInfo) {
    let g = &metrics().provider;
    g.reset();
    g.with_label_values(&[
        info.provider.as_str(),
        info.profile.as_str(),
        if info.real { "true" } else { "false" },
    ])
    .set(1.0);
}

/// Returns the metrics, registering them on first use.
pub fn metrics() -> &'static InferMetrics {
    static METRICS: OnceLock<InferMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = InferMetrics {
            seconds_per_output_second: HistogramVec::new(
                HistogramOpts::new(
                    "lipsync_infer_seconds_per_output_second",
                    "Infer wall time per second of output video, per job",
                )
                .buckets(vec![0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
                &["stage"],
            )
            .expect("valid histogram"),
            steps_per_second: GaugeVec::new(
                Opts::new(
                    "lipsync_infer_steps_per_second",
                    "Denoising steps per second of the running job",
                ),
                &["stage"],
            )
            .expect("valid gauge"),
            idle_seconds: CounterVec::new(
                Opts::new(
                    "lipsync_infer_idle_seconds_total",
                    "Seconds the GPU worker was not inside a model run",
                ),
                &["stage"],
            )
            .expect("valid counter"),
            provider: GaugeVec::new(
                Opts::new(
                    "lipsync_infer_provider",
                    "Execution provider of the infer stage (1 for the one in use), its model profile and whether the weights are real",
                ),
                &["provider", "profile", "real"],
            )
            .expect("valid gauge"),
        };
        let r = prometheus::default_registry();
        let _ = r.register(Box::new(m.seconds_per_output_second.clone()));
        let _ = r.register(Box::new(m.steps_per_second.clone()));
        let _ = r.register(Box::new(m.idle_seconds.clone()));
        let _ = r.register(Box::new(m.provider.clone()));
        m
    })
}
