//! The per-RPC tower layer on the gRPC server: a tracing span per call (gRPC method,
//! with `run_id`, `tenant` and `runner` left for handlers to record) and the RPC
//! latency and status-code metrics.
//!
//! The status is read from the response headers: tonic puts a failed call's
//! `grpc-status` there (trailers-only response), and a successful unary call's in the
//! trailers, so a response without one in its headers counts as `Ok`. Streaming calls
//! are counted when the response starts; a stream that fails later is not recounted.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::metrics::{GrpcMethod, Metrics};

/// Adds [`Observe`] around the server's routes.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, ResBody> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        let method = method_of(path);
        let span = tracing::info_span!(
            "rpc",
            method = %path,
            run_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            runner = tracing::field::Empty,
        );
        // The caller's W3C trace context, when it sent one: this call's span joins it.
        #[cfg(feature = "otel")]
        continue_trace(&span, request.headers());
        let metrics = self.metrics.clone();
        metrics.rpc_started(&method);
        let started = Instant::now();
        Box::pin(
            async move {
                let result = inner.call(request).await;
                let code = match &result {
                    Ok(response) => status_code(response.headers()),
                    Err(_) => tonic::Code::Internal,
                };
                metrics.rpc(&method, code, started.elapsed());
                if code != tonic::Code::Ok {
                    tracing::debug!(?code, "rpc failed");
                }
                result
            }
            .instrument(span),
        )
    }
}

/// The labels of the method at `path`; `unknown` for anything this server does not
/// serve (an unknown method of a known service included), so no caller can grow the
/// metrics' label sets.
fn method_of(path: &str) -> GrpcMethod {
    static KNOWN: LazyLock<HashMap<String, GrpcMethod>> = LazyLock::new(known_methods);
    KNOWN.get(path).cloned().unwrap_or_else(|| GrpcMethod {
        grpc_service: "unknown".into(),
        grpc_method: "unknown".into(),
        grpc_type: "unknown".into(),
    })
}

/// Every method served, by path: the API's (from its file descriptor set), health and
/// reflection.
fn known_methods() -> HashMap<String, GrpcMethod> {
    let api = prost_types::FileDescriptorSet::decode(agentrun_shared::proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled-in descriptor set decodes");
    let mut methods: Vec<(String, String, bool, bool)> = api
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    (
                        format!("{}.{}", file.package(), service.name()),
                        method.name().to_owned(),
                        method.client_streaming(),
                        method.server_streaming(),
                    )
                })
            })
        })
        .collect();
    for (service, method, client_streaming, server_streaming) in [
        ("grpc.health.v1.Health", "Check", false, false),
        ("grpc.health.v1.Health", "Watch", false, true),
        (
            "grpc.reflection.v1.ServerReflection",
            "ServerReflectionInfo",
            true,
            true,
        ),
        (
            "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
            true,
            true,
        ),
    ] {
        methods.push((
            service.into(),
            method.into(),
            client_streaming,
            server_streaming,
        ));
    }
    methods
        .into_iter()
        .map(|(service, method, client_streaming, server_streaming)| {
            let kind = match (client_streaming, server_streaming) {
                (false, false) => "unary",
                (true, false) => "client_stream",
                (false, true) => "server_stream",
                (true, true) => "bidi_stream",
            };
            let labels = GrpcMethod {
                grpc_service: service.clone(),
                grpc_method: method.clone(),
                grpc_type: kind.into(),
            };
            (format!("/{service}/{method}"), labels)
        })
        .collect()
}

fn status_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// Makes `span` a child of the trace context in `headers` (`traceparent`, `tracestate`).
#[cfg(feature = "otel")]
fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    agentrun_shared::otel::continue_trace(span, |key| {
        headers.get(key)?.to_str().ok().map(str::to_owned)
    });
}

/// The trace context runs created by the current call continue: the call's own span
/// when spans are exported, else the caller's `traceparent` as it came, if well formed.
pub fn trace_parent(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    #[cfg(feature = "otel")]
    if let Some(own) = agentrun_shared::otel::current_traceparent() {
        return Some(own);
    }
    let given = metadata.get("traceparent")?.to_str().ok()?.trim();
    agentrun_shared::trace::is_traceparent(given).then(|| given.to_owned())
}

/// Records the run a call acts on in the current `rpc` span.
pub fn record_run(run_id: &impl std::fmt::Display) {
    tracing::Span::current().record("run_id", tracing::field::display(run_id));
}

/// Records the calling tenant in the current `rpc` span.
pub fn record_tenant(tenant: &str) {
    tracing::Span::current().record("tenant", tenant);
}

/// Records the calling runner in the current `rpc` span.
pub fn record_runner(runner_id: &impl std::fmt::Display) {
    tracing::Span::current().record("runner", tracing::field::display(runner_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_their_own_labels() {
        let create = method_of("/agentrun.v1.RunService/CreateRun");
        assert_eq!(
            (
                create.grpc_service.as_str(),
                create.grpc_method.as_str(),
                create.grpc_type.as_str()
            ),
            ("agentrun.v1.RunService", "CreateRun", "unary")
        );
        assert_eq!(
            method_of("/agentrun.v1.RunService/WatchRun").grpc_type,
            "server_stream"
        );
        assert_eq!(
            method_of("/agentrun.v1.RunnerService/Connect").grpc_type,
            "bidi_stream"
        );
        assert_eq!(
            method_of("/grpc.health.v1.Health/Check").grpc_method,
            "Check"
        );
        for unknown in [
            "/agentrun.v1.RunService/NoSuchMethod",
            "/agentrun.v1.Nope/CreateRun",
            "/random/path",
            "",
        ] {
            let labels = method_of(unknown);
            assert_eq!(
                (labels.grpc_service.as_str(), labels.grpc_method.as_str()),
                ("unknown", "unknown"),
                "{unknown}"
            );
        }
    }
}
