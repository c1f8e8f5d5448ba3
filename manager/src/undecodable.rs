//! The server layer that ends a call with INVALID_ARGUMENT when one of its request
//! messages did not decode, even if the handler took the stream's error as its end and
//! finished normally (the runner stream does): the caller sent bytes that are not the
//! message, and must hear so rather than see a clean end. See `agentrun_shared::codec`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use agentrun_shared::codec::DecodeFailure;
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

/// Adds [`Undecodable`] around the server's routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct UndecodableLayer;

impl<S> Layer<S> for UndecodableLayer {
    type Service = Undecodable<S>;

    fn layer(&self, inner: S) -> Undecodable<S> {
        Undecodable { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Undecodable<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for Undecodable<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<FailedDecodeBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let failure = DecodeFailure::default();
        // The handler's decoders are created while its future first runs: in the scope.
        let call = failure.scope(inner.call(request));
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| FailedDecodeBody { body, failure }))
        })
    }
}

/// A response body whose OK trailers become the call's decode failure, if it had one.
pub struct FailedDecodeBody<B> {
    body: B,
    failure: DecodeFailure,
}

impl<B: Body + Unpin> Body for FailedDecodeBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame);
        };
        let frame = match frame.into_trailers() {
            Ok(mut trailers) => {
                let ok = trailers.get("grpc-status").is_none_or(|code| code == "0");
                if let (true, Some(status)) = (ok, self.failure.get()) {
                    tracing::debug!(%status, "request message did not decode; ending the call with it");
                    // Only fails for a message that cannot be a header value; prost's
                    // are percent-encoded by tonic, so keep the trailers as they were.
                    let _ = status.add_header(&mut trailers);
                }
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
