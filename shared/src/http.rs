//! A deliberately tiny HTTP/1.1 responder for the operational endpoints (the manager's
//! `/metrics`, the runner's `/metrics` and `/healthz`): one GET per connection, then
//! close. Nothing a client sends can make it hold more than a small request head, or
//! hold a connection past a short deadline.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a client has to send its request line and headers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; these requests are tiny.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The Prometheus/OpenMetrics text content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An answer: status line (`"200 OK"`), content type and body.
pub struct Reply {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn new(status: &'static str, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body,
        }
    }

    pub fn not_found() -> Self {
        Self::new("404 Not Found", "text/plain", "not found\n".into())
    }
}

/// Binds `addr`; `None` when it is empty (the endpoint is off). `setting` names the flag
/// in the error.
pub async fn bind(setting: &str, addr: &str) -> Result<Option<TcpListener>, String> {
    if addr.trim().is_empty() {
        return Ok(None);
    }
    let parsed: std::net::SocketAddr = addr
        .parse()
        .map_err(|err| format!("{setting} {addr:?}: {err}"))?;
    let listener = TcpListener::bind(parsed)
        .await
        .map_err(|err| format!("{setting} {addr}: {err}"))?;
    Ok(Some(listener))
}

/// Answers each GET on `listener` with `handle(path)` until `shutdown`; any other method
/// is 405.
pub async fn serve<H, F>(listener: TcpListener, handle: H, shutdown: CancellationToken)
where
    H: Fn(String) -> F + Clone + Send + 'static,
    F: Future<Output = Reply> + Send,
{
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, say: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _ = respond(stream, handle).await;
        });
    }
}

async fn respond<H, F>(mut stream: TcpStream, handle: H) -> std::io::Result<()>
where
    H: Fn(String) -> F,
    F: Future<Output = Reply>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .is_err()
    {
        return Ok(());
    }
    let request_line = String::from_utf8_lossy(&head);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("").to_owned();
    let reply = match method {
        "GET" => handle(path).await,
        _ => Reply::new(
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
