//! The per-RPC tower layer on the gRPC server: a tracing span per call (gRPC method,
//! with `run_id`, `tenant` and `runner` left for handlers to record) and the RPC
//! latency and status-code metrics.
//!
//! The status is read from the response headers: tonic puts a failed call's
//! `grpc-status` there (trailers-only response), and a successful unary call's in the
//! trailers, so a response without one in its headers counts as `Ok`. Streaming calls
//! are counted when the response starts; a stream that fails later is not recounted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

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

/// The gRPC path for this server's services; anything else is `other`, so unknown
/// paths cannot grow the metric's label set without bound.
fn method_label(path: &str) -> String {
    if path.starts_with("/agentrun.") || path.starts_with("/grpc.") {
        path.to_owned()
    } else {
        "other".to_owned()
    }
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
