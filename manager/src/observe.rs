//! The per-RPC tower layer on the gRPC server: a tracing span per call (gRPC method,
//! with `run_id`, `tenant` and `runner` left for handlers to record) and the RPC
//! latency and status-code metrics.
//!
//! The status is read from the response headers: tonic puts a failed call's
//! `grpc-status` there (trailers-only response), and a successful unary call's in the
//! trailers, so a response without one in its headers counts as `Ok`. Streaming calls
//! are counted when the response starts; a stream that fails later is not recounted.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::metrics::Metrics;

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
        let method = method_label(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            run_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            runner = tracing::field::Empty,
        );
        let metrics = self.metrics.clone();
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

/// The gRPC path of a method this server serves; anything else (an unknown method of a
/// known service included) is `other`, so no caller can grow the metric's label set.
fn method_label(path: &str) -> String {
    static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(known_methods);
    if KNOWN.contains(path) {
        path.to_owned()
    } else {
        "other".to_owned()
    }
}

/// Every method path served: the API's (from its file descriptor set), health and
/// reflection.
fn known_methods() -> HashSet<String> {
    let api = prost_types::FileDescriptorSet::decode(agentrun_shared::proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled-in descriptor set decodes");
    let mut paths: HashSet<String> = api
        .file
        .iter()
        .flat_map(|file| {
            file.service.iter().flat_map(move |service| {
                service.method.iter().map(move |method| {
                    format!("/{}.{}/{}", file.package(), service.name(), method.name())
                })
            })
        })
        .collect();
    paths.extend(
        [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(str::to_owned),
    );
    paths
}

fn status_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
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
    fn only_served_methods_get_their_own_label() {
        assert_eq!(
            method_label("/agentrun.v1.RunService/CreateRun"),
            "/agentrun.v1.RunService/CreateRun"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for unknown in [
            "/agentrun.v1.RunService/NoSuchMethod",
            "/agentrun.v1.Nope/CreateRun",
            "/random/path",
            "",
        ] {
            assert_eq!(method_label(unknown), "other", "{unknown}");
        }
    }
}
