//! The gRPC listener's accept loop and the connections it hands to tonic.
//!
//! tonic's own `TcpListenerStream` accepts without bound, keeps a connection that never
//! speaks HTTP/2 open forever, and retries a failed `accept` (EMFILE: out of descriptors)
//! at once, spinning a core while nothing can be served. This loop instead:
//!
//! - holds at most `max_connections` open: past the cap it stops accepting (new clients
//!   wait in the kernel's listen backlog) until one closes — each [`Connection`] holds a
//!   semaphore permit, given back when tonic drops it;
//! - backs off on `accept` errors other than a single connection's failure (EMFILE,
//!   ENFILE, ENOBUFS), from 5 ms doubling to 1 s, instead of spinning;
//! - closes a plaintext connection that has not sent the 24-byte HTTP/2 client preface
//!   within the handshake timeout (over TLS, tonic's TLS handshake timeout does that
//!   for the TLS handshake, see `startup`);
//! - closes a connection from which nothing has arrived for the idle timeout. The server
//!   pings every connection after its keepalive interval and a live peer answers, so
//!   only silent peers (gone, stalled, or past TLS but never sending the preface) hit it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first and the longest pause after a failed `accept`.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// The accept loop's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a plaintext connection has to send the HTTP/2 preface (or, when
    /// `http1`, its first bytes).
    pub handshake_timeout: Duration,
    /// How long a connection may send nothing at all; `None`: forever.
    pub idle_timeout: Option<Duration>,
    /// Whether tonic runs TLS over these connections: the bytes are then TLS records, and
    /// the handshake deadline is tonic's.
    pub tls: bool,
    /// HTTP/1.1 is served too (the UI port): any first bytes complete the handshake.
    pub http1: bool,
}

/// The connections accepted from `listener` within `limits`, for
/// `Server::serve_with_incoming_shutdown`. It never yields an error: accept errors are
/// retried here, with a back-off when they are not about one connection.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl Stream<Item = Result<Connection, std::convert::Infallible>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| async move {
        let connection = accept(&listener, &slots, limits).await;
        Some((Ok(connection), (listener, slots)))
    })
}

/// Waits for a free slot, then for a connection.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>, limits: Limits) -> Connection {
    let permit = match slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            if warn_now(&CAP_WARNED) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection cap reached: not accepting until a connection closes"
                );
            }
            slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed")
        }
    };
    let mut backoff = BACKOFF.0;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // As tonic's own listener does: gRPC messages are small and latency-bound.
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "cannot set TCP_NODELAY");
                }
                return Connection::new(stream, permit, limits);
            }
            // The connection went away before it was accepted: take the next one.
            Err(err) if is_per_connection(&err) => continue,
            Err(err) => {
                // Out of descriptors or buffers: nothing to gain from retrying at once.
                // Connections closing (handshake and idle timeouts included) free some.
                if warn_now(&ACCEPT_WARNED) {
                    tracing::warn!(error = %err, ?backoff, "accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// When the cap and accept-error warnings were last logged: at most one a minute each,
/// since an attack would otherwise turn them into a log flood.
static CAP_WARNED: Mutex<Option<std::time::Instant>> = Mutex::new(None);
static ACCEPT_WARNED: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// Whether a warning last logged at `last` may be logged again now (and notes it was).
fn warn_now(last: &Mutex<Option<std::time::Instant>>) -> bool {
    let mut last = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = std::time::Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(60)) {
        return false;
    }
    *last = Some(now);
    true
}

/// Whether an `accept` error concerns only the connection being accepted.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// An accepted TCP connection holding its slot under the cap, with its handshake and
/// idle deadlines. Reads fail with `TimedOut` past a deadline, which ends the connection.
pub struct Connection {
    stream: TcpStream,
    /// Given back when tonic drops the connection.
    _slot: OwnedSemaphorePermit,
    /// Bytes of the HTTP/2 preface seen so far; `None` once it is complete, or over TLS.
    preface: Option<usize>,
    /// Any first bytes complete the handshake (HTTP/1.1 is served too).
    http1: bool,
    /// The handshake deadline until the preface is complete, then the idle deadline
    /// (checked against `last_read` when it fires, so a read need not reset the timer).
    deadline: Option<Pin<Box<Sleep>>>,
    idle_timeout: Option<Duration>,
    last_read: Instant,
}

impl Connection {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, limits: Limits) -> Self {
        let now = Instant::now();
        let (preface, first) = if limits.tls {
            // tonic's TLS acceptor bounds the TLS handshake; after it, the idle timeout.
            (None, limits.idle_timeout)
        } else {
            (Some(0), Some(limits.handshake_timeout))
        };
        Self {
            stream,
            _slot: slot,
            preface,
            http1: limits.http1,
            deadline: first.map(|after| Box::pin(tokio::time::sleep_until(now + after))),
            idle_timeout: limits.idle_timeout,
            last_read: now,
        }
    }

    /// Notes bytes read: the preface's progress, and when the peer last sent anything.
    fn on_read(&mut self, bytes: &[u8]) {
        self.last_read = Instant::now();
        let Some(seen) = self.preface else { return };
        let n = bytes.len().min(PREFACE.len() - seen);
        if self.http1 {
            // Whatever the protocol, the peer spoke: on to the idle deadline.
        } else if bytes[..n] != PREFACE[seen..seen + n] {
            // Not HTTP/2: hyper refuses it; until then the handshake deadline holds.
            return;
        } else if seen + n < PREFACE.len() {
            self.preface = Some(seen + n);
            return;
        }
        self.preface = None;
        self.deadline = self
            .idle_timeout
            .map(|after| Box::pin(tokio::time::sleep_until(self.last_read + after)));
    }

    /// Whether a deadline has passed (registering the waker when it has not).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let Some(deadline) = self.deadline.as_mut() else {
                return false;
            };
            if deadline.as_mut().poll(cx).is_pending() {
                return false;
            }
            match (self.preface, self.idle_timeout) {
                // The idle deadline: moved on if something arrived since it was set.
                (None, Some(idle)) if self.last_read + idle > Instant::now() => {
                    deadline.as_mut().reset(self.last_read + idle);
                }
                _ => return true,
            }
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.on_read(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending if this.poll_expired(cx) => {
                let what = if this.preface.is_some() {
                    "no HTTP/2 preface within the handshake timeout"
                } else {
                    "nothing received within the idle timeout"
                };
                tracing::debug!(peer = ?this.stream.peer_addr().ok(), what, "closing connection");
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The same connection info as a plain `TcpStream`, so `remote_addr()` and, over TLS,
/// `peer_certs()` work unchanged.
impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// Descriptors a replica keeps for itself besides client connections: the database pool
/// and its LISTEN connection, the listeners, the runtime's own (epoll, eventfd, stdio)
/// and some slack.
pub fn reserved_descriptors(db_pool_size: usize) -> usize {
    db_pool_size + 64
}

/// The connection cap that the descriptor limit allows: `max_connections`, after
/// raising the soft `RLIMIT_NOFILE` toward the hard limit if it is short, or lowered
/// (with a warning) to what the limit leaves once the reserve is set aside.
pub fn effective_max_connections(max_connections: usize, db_pool_size: usize) -> usize {
    let reserve = reserved_descriptors(db_pool_size);
    let needed = (max_connections + reserve) as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the current limits into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return max_connections;
    }
    if limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur < needed {
        let raised = libc::rlimit {
            rlim_cur: needed.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads `raised`; the soft limit stays within the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = raised.rlim_cur;
        }
    }
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= needed {
        return max_connections;
    }
    let capped = (limit.rlim_cur as usize).saturating_sub(reserve).max(1);
    tracing::warn!(
        max_connections,
        rlimit_nofile = limit.rlim_cur,
        needed,
        capped,
        "RLIMIT_NOFILE is below what --max-connections needs (connections plus the \
         database pool and 64 spare); capping connections to fit. Raise the limit \
         (ulimit -n, LimitNOFILE=, or the container runtime's nofile)"
    );
    capped
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(limits: Limits) -> (Connection, TcpStream, Arc<Semaphore>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let server = accept(&listener, &slots, limits).await;
        (server, client, slots)
    }

    fn limits() -> Limits {
        Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(200),
            idle_timeout: Some(Duration::from_millis(600)),
            tls: false,
            http1: false,
        }
    }

    async fn read(connection: &mut Connection) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        connection.read(&mut buf).await
    }

    #[tokio::test]
    async fn a_connection_without_the_preface_times_out() {
        let (mut server, _client, _) = pair(limits()).await;
        let err = read(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn the_preface_in_pieces_moves_on_to_the_idle_deadline() {
        use tokio::io::AsyncWriteExt;
        let (mut server, mut client, _) = pair(limits()).await;
        client.write_all(&PREFACE[..10]).await.unwrap();
        assert_eq!(read(&mut server).await.unwrap(), 10);
        assert!(server.preface.is_some());
        client.write_all(&PREFACE[10..]).await.unwrap();
        assert_eq!(read(&mut server).await.unwrap(), 14);
        assert!(server.preface.is_none());
        // Past the handshake timeout, within the idle one: still open.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(read(&mut server).await.unwrap(), 1);
        let started = Instant::now();
        let err = read(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn something_else_than_the_preface_keeps_the_handshake_deadline() {
        use tokio::io::AsyncWriteExt;
        let (mut server, mut client, _) = pair(limits()).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(read(&mut server).await.unwrap() > 0);
        let err = read(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_slot_is_held_while_the_connection_lives() {
        let (server, _client, slots) = pair(limits()).await;
        assert_eq!(slots.available_permits(), 1);
        drop(server);
        assert_eq!(slots.available_permits(), 2);
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        // However the limit stands, the cap plus the reserve fits within it.
        let cap = effective_max_connections(usize::MAX / 4, 16);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes into `limit`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        if limit.rlim_cur != libc::RLIM_INFINITY {
            assert!(cap + reserved_descriptors(16) <= limit.rlim_cur as usize);
        }
    }
}
