//! The server layer that names the caller's wire-level mistakes for what they are:
//!
//! - A request message that did not decode ends its call INVALID_ARGUMENT, even if the
//!   handler took the stream's error as its end and finished normally (the runner stream
//!   does): the caller sent bytes that are not the message, and must hear so rather than
//!   see a clean end. See `agentrun_shared::codec`.
//! - A message over the size limit ([`crate::config::MAX_MESSAGE_BYTES`]) is
//!   RESOURCE_EXHAUSTED naming the limit, where tonic says OUT_OF_RANGE.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use agentrun_shared::codec::DecodeFailure;
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

/// Adds [`WireErrors`] around the server's routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireErrorsLayer;

impl<S> Layer<S> for WireErrorsLayer {
    type Service = WireErrors<S>;

    fn layer(&self, inner: S) -> WireErrors<S> {
        WireErrors { inner }
    }
}

#[derive(Debug, Clone)]
pub struct WireErrors<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for WireErrors<S>
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
            let mut response = call.await?;
            // A call refused before any message (trailers-only) has its status here.
            over_size_limit(response.headers_mut());
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
                over_size_limit(&mut trailers);
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

/// Rewrites tonic's OUT_OF_RANGE for a message over the size limit as RESOURCE_EXHAUSTED,
/// saying which message, how large it was and what the limit is.
fn over_size_limit(headers: &mut http::HeaderMap) {
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    if status.code() != tonic::Code::OutOfRange {
        return;
    }
    let message = status.message();
    let (what, sizes) = if let Some(sizes) =
        message.strip_prefix("Error, decoded message length too large: ")
    {
        ("request", sizes)
    } else if let Some(sizes) = message.strip_prefix("Error, encoded message length too large: ") {
        ("response", sizes)
    } else {
        return;
    };
    // "found N bytes, the limit is: M bytes"
    let numbers: Vec<&str> = sizes
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .collect();
    let text = match numbers.as_slice() {
        [found, limit] => format!(
            "the {what} message is {found} bytes, over the limit of {limit} bytes per message"
        ),
        _ => format!("the {what} message is over the size limit ({sizes})"),
    };
    let _ = tonic::Status::resource_exhausted(text).add_header(headers);
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn an_oversized_request_is_resource_exhausted_naming_the_limit() {
        let mut headers = http::HeaderMap::new();
        tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5242880 bytes, the limit is: 4194304 bytes",
        )
        .add_header(&mut headers)
        .unwrap();
        over_size_limit(&mut headers);
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the request message is 5242880 bytes, over the limit of 4194304 bytes per message"
        );
    }

    #[test]
    fn other_statuses_are_left_alone() {
        let mut headers = http::HeaderMap::new();
        tonic::Status::out_of_range("after_seq is past the end")
            .add_header(&mut headers)
            .unwrap();
        over_size_limit(&mut headers);
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }
}
