//! OpenTelemetry trace export and the W3C trace context, for the manager and the runner
//! (feature `otel`).
//!
//! Export is configured from the standard variables: the endpoint from the process's
//! own setting, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (none: no export); `OTEL_SERVICE_NAME` (default the binary's name) and
//! `OTEL_RESOURCE_ATTRIBUTES` name the process; the `OTEL_BSP_*` variables tune batching.
//! Spans are tracing spans, exported through `tracing-opentelemetry`.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

/// Keeps the exporter alive; dropping it flushes what is buffered.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// The collector spans go to: `endpoint` (a process setting) if given, else the standard
/// variables; `None` when nothing is set.
pub fn endpoint(given: Option<&str>) -> Option<String> {
    let from_env = |name: &str| std::env::var(name).ok();
    given
        .map(str::to_owned)
        .or_else(|| from_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| from_env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .filter(|e| !e.trim().is_empty())
}

/// A layer exporting spans by OTLP/gRPC to `endpoint`, with the exporter that must live
/// as long as it; the service is `default_service` unless `OTEL_SERVICE_NAME` says
/// otherwise.
pub fn layer<S>(
    default_service: &'static str,
    endpoint: &str,
) -> Result<(OpenTelemetryLayer<S, Tracer>, Exporter), opentelemetry_otlp::ExporterBuildError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    // The default detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(default_service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(default_service));
    Ok((layer, Exporter { provider }))
}

/// Makes `span` continue the trace whose context `get` finds (`traceparent`,
/// `tracestate`); nothing when there is none.
pub fn continue_trace(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), get(key)?)))
        .collect();
    if carrier.contains_key("traceparent") {
        let context = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(context);
    }
}

/// The `traceparent` of the current span, when spans are exported (else `None`).
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let own = span.span_context();
    own.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            own.trace_id(),
            own.span_id(),
            own.trace_flags().to_u8()
        )
    })
}
