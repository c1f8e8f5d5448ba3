//! A TCP proxy for fault tests: it sits between a client (a runner, a watching client)
//! and a real address (a manager) and, on command, breaks the network between them.
//!
//! - [`Proxy::cut_all`] resets every live connection at once, as a dropped NAT entry or
//!   a restarted load balancer would;
//! - [`Proxy::stall`] stops forwarding bytes both ways without closing anything (a
//!   partition: the peers only notice through their own timeouts), and resumes;
//! - [`Proxy::refuse`] closes new connections as soon as they are accepted.
//!
//! Bytes are forwarded as they come; the proxy knows nothing of HTTP/2 or gRPC.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A TCP proxy on `127.0.0.1:<free port>` forwarding to one target; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

struct State {
    target: SocketAddr,
    /// Cancelled by `cut_all` (ending every connection accepted before), then replaced.
    generation: Mutex<CancellationToken>,
    /// True while no byte may pass.
    stalled: watch::Sender<bool>,
    refusing: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl Proxy {
    /// Listens on a free local port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(State {
            target,
            generation: Mutex::new(CancellationToken::new()),
            stalled: watch::Sender::new(false),
            refusing: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Self {
            addr,
            state,
            accept,
        }
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of [`Self::addr`], for `AGENTRUN_MANAGER_URL` and channels.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resets every live connection now (both sides see a connection reset). Later
    /// connections are forwarded as usual.
    pub fn cut_all(&self) {
        let mut generation = self.state.generation.lock().expect("proxy lock");
        generation.cancel();
        *generation = CancellationToken::new();
    }

    /// `true`: stop forwarding bytes both ways, closing nothing; `false`: resume.
    /// Connections accepted meanwhile are stalled too.
    pub fn stall(&self, on: bool) {
        self.state.stalled.send_replace(on);
    }

    /// `true`: close new connections as soon as they are accepted; `false`: accept
    /// them again. Live connections are not affected (see [`Self::cut_all`]).
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }

    /// Connections forwarded so far (not counting refused ones).
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.generation.lock().expect("proxy lock").cancel();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        if state.refusing.load(Ordering::SeqCst) {
            state.refused.fetch_add(1, Ordering::SeqCst);
            // A reset rather than an orderly close: the client sees the connection fail.
            let _ = socket.set_zero_linger();
            drop(socket);
            continue;
        }
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let cut = state.generation.lock().expect("proxy lock").clone();
        tokio::spawn(forward(socket, state.clone(), cut));
    }
}

/// Forwards one connection until either side closes it or it is cut.
async fn forward(client: TcpStream, state: Arc<State>, cut: CancellationToken) {
    let server = tokio::select! {
        connected = TcpStream::connect(state.target) => match connected {
            Ok(server) => server,
            Err(_) => return,
        },
        _ = cut.cancelled() => return,
    };
    for socket in [&client, &server] {
        let _ = socket.set_nodelay(true);
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut_off = {
        let both_ways = async {
            tokio::join!(
                pump(
                    &mut client_read,
                    &mut server_write,
                    state.stalled.subscribe()
                ),
                pump(
                    &mut server_read,
                    &mut client_write,
                    state.stalled.subscribe()
                ),
            )
        };
        tokio::select! {
            _ = both_ways => false,
            _ = cut.cancelled() => true,
        }
    };
    if cut_off {
        // A reset, not an orderly close: both peers see the connection fail.
        let _ = client_write.as_ref().set_zero_linger();
        let _ = server_write.as_ref().set_zero_linger();
    }
}

/// Copies bytes one way until the source closes, holding them while the proxy is stalled.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            break;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                break;
            }
            Ok(n) => n,
        };
        // A stall that began while this read waited holds its bytes back too.
        if stalled.wait_for(|s| !*s).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}
