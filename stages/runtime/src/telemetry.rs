//! Logging and trace export shared by every binary.
//!
//! Every process logs through one `tracing` subscriber. With `trace.otlp_endpoint` set,
//! the spans of the `lipsync_*` crates are also exported as OpenTelemetry traces over
//! OTLP/HTTP (protobuf). A task is one trace: its trace id is the task id's 32 hex digits
//! ([`crate::runner::trace_id`]), the gateway's `task` span is the root, and each stage's
//! `job` span is the child of the span that published its work message (the W3C
//! `traceparent` header), so a trace shows fetch, face and audio, infer and mux in causal
//! order. Without an endpoint nothing is exported and the same ids still appear in logs.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SdkTracerProvider,
};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::config::{EXIT_USAGE, LogConfig, LogFormat, TraceConfig};

/// The exporting provider, when `trace.otlp_endpoint` is set.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

thread_local! {
    /// The trace id the next root span built on this thread takes (see [`root_trace`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except that a task's root span takes the task's trace id.
#[derive(Debug, Default)]
struct TaskIds(RandomIdGenerator);

impl IdGenerator for TaskIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// Install the global subscriber. `RUST_LOG` wins over `log.filter`. Safe to call more
/// than once (later calls are ignored), so tests can run several stages in one process.
/// An unusable `trace.otlp_endpoint` ends the process with exit code 64.
pub fn init(log: &LogConfig, trace: &TraceConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&log.filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let lines = match log.format {
        LogFormat::Pretty => fmt::layer().pretty().boxed(),
        LogFormat::Compact => fmt::layer().compact().boxed(),
        LogFormat::Json => fmt::layer().json().flatten_event(true).boxed(),
    }
    .with_filter(filter);
    let export = match exporting_provider(trace) {
        Ok(None) => None,
        Ok(Some(provider)) => {
            let tracer = provider.tracer("lipsync");
            if PROVIDER.set(provider).is_err() {
                // A second init in one process keeps the first subscriber and provider.
                return;
            }
            // Own spans only: the job and task spans (and their events), not every
            // HTTP request or client library span.
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(Targets::new().with_target("lipsync", Level::INFO)),
            )
        }
        Err(e) => {
            eprintln!("error: invalid configuration: trace.otlp_endpoint: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let _ = tracing_subscriber::registry()
        .with(lines)
        .with(export)
        .try_init();
}

/// The OTLP endpoint URL of the traces signal.
fn traces_url(endpoint: &str) -> Result<String, String> {
    let url = url::Url::parse(endpoint.trim()).map_err(|e| format!("{endpoint:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{endpoint:?}: only http and https are supported"));
    }
    let mut s = url.as_str().trim_end_matches('/').to_owned();
    if !s.ends_with("/v1/traces") {
        s.push_str("/v1/traces");
    }
    Ok(s)
}

fn exporting_provider(trace: &TraceConfig) -> Result<Option<SdkTracerProvider>, String> {
    if trace.otlp_endpoint.trim().is_empty() {
        return Ok(None);
    }
    let url = traces_url(&trace.otlp_endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(trace.export_timeout_s.max(1)))
        .build()
        .map_err(|e| e.to_string())?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(trace.export_interval_ms.max(1)))
                .with_max_queue_size(trace.max_queued_spans.max(1))
                .build(),
        )
        .build();
    let service = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "lipsync".into());
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_id_generator(TaskIds::default())
            .with_resource(Resource::builder().with_service_name(service).build())
            .build(),
    ))
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Make `span` (created with `parent: None`) the root of the trace `trace_id` (32 hex
/// digits). Without export, or for a malformed id, nothing changes.
pub fn root_trace(span: &tracing::Span, trace_id: &str) {
    let Ok(id) = TraceId::from_hex(trace_id) else {
        return;
    };
    if !exporting() || id == TraceId::INVALID {
        return;
    }
    NEXT_TRACE_ID.with(|c| c.set(Some(id)));
    // Building the span now takes the id on this thread.
    let _ = span.context();
    NEXT_TRACE_ID.with(|c| c.set(None));
}

/// Make `span` the child of the remote span a W3C `traceparent` names. Returns false
/// (and changes nothing) for a malformed header.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) -> bool {
    let Some((trace, parent)) = parse_traceparent(traceparent) else {
        return false;
    };
    if exporting() {
        let sc = SpanContext::new(
            trace,
            parent,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
    true
}

/// `(trace id, span id)` of a version-00 `traceparent`.
fn parse_traceparent(tp: &str) -> Option<(TraceId, SpanId)> {
    let mut parts = tp.trim().split('-');
    let (version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    (trace != TraceId::INVALID && span != SpanId::INVALID).then_some((trace, span))
}

/// The `traceparent` of the current span, when it is exported.
pub fn current_traceparent() -> Option<String> {
    if !exporting() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| format!("00-{}-{}-01", sc.trace_id(), sc.span_id()))
}

/// Export what is still queued and stop exporting (at exit). Returns at once without
/// export; waits at most `trace.export_timeout_s` per batch otherwise.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        // The blocking HTTP client must not be driven from inside an async runtime.
        let _ = std::thread::spawn(move || p.shutdown()).join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_traces_path_once() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c.example/otlp/v1/traces").unwrap(),
            "https://c.example/otlp/v1/traces"
        );
        assert!(traces_url("grpc://collector:4317").is_err());
        assert!(traces_url("collector:4318").is_err());
    }

    #[test]
    fn traceparents_parse_strictly() {
        let (t, s) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.to_string(), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
