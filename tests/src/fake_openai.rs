//! A local OpenAI-compatible endpoint for tests: streams a short reply per request and
//! records each request's body, optionally failing the first requests (rate limits,
//! server errors) to exercise the provider's retries.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// An OpenAI-compatible endpoint that answers every request with the stream of
/// `reply N` (N counting requests from 1) and records each request's body.
pub struct FakeOpenAi {
    pub addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        Self::failing_first(Vec::new()).await
    }

    /// Like [`Self::start`], but the first requests are answered with `failures` in
    /// order (a status code and a `Retry-After` value, if any); they are recorded too.
    pub async fn failing_first(failures: Vec<(u16, Option<&'static str>)>) -> Self {
        let failures = Arc::new(failures);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                let failures = failures.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head_end, length) = loop {
                        let n = socket.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (at + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let n = socket.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body: Value =
                        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(body);
                        seen.len()
                    };
                    if let Some((status, retry_after)) = failures.get(n - 1) {
                        let retry_after = retry_after
                            .map(|s| format!("retry-after: {s}\r\n"))
                            .unwrap_or_default();
                        let response = format!(
                            "HTTP/1.1 {status} Failed\r\n{retry_after}content-type: application/json\r\n\
                             content-length: 2\r\nconnection: close\r\n\r\n{{}}"
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                        return;
                    }
                    let n = n - failures.len();
                    let delta = json!({"choices": [{"index": 0, "delta": {"content": format!("reply {n}")}, "finish_reason": null}]});
                    let finish =
                        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
                         data: {delta}\n\ndata: {finish}\n\ndata: [DONE]\n\n"
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { addr, bodies }
    }

    /// The body of every request received, in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}
