//! The abuse section: a hostile or careless caller, against real manager and runner
//! processes with authentication on, must not exhaust the manager, starve another
//! tenant, stop the service or learn what another tenant has. Sizes are cut so CI stays
//! fast; the README's "Limits and quotas" section gives the full-size run.
//!
//! | test | abuse |
//! |---|---|
//! | `idle_sockets_past_the_connection_cap_are_closed_and_keyed_calls_get_through` | 60 idle sockets (no HTTP/2 preface) against a cap of 50 |
//! | `out_of_descriptors_the_manager_backs_off_and_recovers` | idle sockets past `RLIMIT_NOFILE` (EMFILE on accept) |
//! | `the_manager_advertises_its_concurrent_stream_limit` | unbounded streams on one connection |
//! | `undecodable_requests_are_invalid_arguments_and_create_nothing` | garbage bytes, invalid UTF-8 in a string field |
//! | `an_undecodable_first_message_on_the_runner_stream_is_an_invalid_argument` | the same as the runner stream's first message |
//! | `an_undecodable_message_mid_stream_ends_the_runner_stream_with_invalid_argument` | the same after a hello |

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use bytes::{Buf, BufMut};
use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Request;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use super::*;

/// Creates an API key straight in the database, as `agentrun-manager keys create` does.
async fn key(database_url: &str, tenant: &str, role: Role) -> String {
    let pool = db::pool(database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    api_keys::create(&client, tenant, role, &[], "abuse test")
        .await
        .expect("create key")
        .key
}

/// `message` carrying `key` as a bearer token.
fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII key"),
    );
    request
}

/// A manager process requiring API keys, with `env` on top.
async fn secured_manager(database_url: &str, env: &[(&str, &str)]) -> ManagerProcess {
    let mut all = vec![("AGENTRUN_AUTH", "required")];
    all.extend_from_slice(env);
    ManagerProcess::start(database_url, &all).await
}

/// The CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // The command name may hold spaces: count fields after its closing parenthesis,
    // where field 3 (state) starts; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a command name") + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Opens `n` TCP connections that never send a byte (not even the HTTP/2 preface).
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        // The kernel completes the TCP handshake from the listen backlog, so this
        // succeeds whether or not the manager has accepted the connection yet.
        sockets.push(TcpStream::connect(addr).await.expect("connect"));
    }
    sockets
}

/// Whether the peer closes `socket` (EOF or reset) before `deadline`; what it sent
/// first (its SETTINGS, a GOAWAY) is read and discarded.
async fn closed_by_peer(socket: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout_at(deadline.into(), closed)
        .await
        .is_ok()
}

/// Asserts every socket is closed by the manager before `deadline`.
async fn assert_all_closed(sockets: &mut [TcpStream], deadline: Instant) {
    for (i, socket) in sockets.iter_mut().enumerate() {
        assert!(
            closed_by_peer(socket, deadline).await,
            "idle socket {i} of {} still open: a connection that never sent the HTTP/2 \
             preface must be closed after the handshake timeout",
            sockets.len()
        );
    }
}

/// A client key's CreateRun on a new connection, which must be served within `within`.
async fn keyed_call_served(addr: SocketAddr, key: &str, within: Duration) -> proto::Run {
    let mut client = RunServiceClient::new(lazy_channel(addr));
    tokio::time::timeout(
        within,
        client.create_run(with_key(key, run_request("still served"))),
    )
    .await
    .unwrap_or_else(|_| panic!("a keyed call on a new connection was not served within {within:?}"))
    .expect("create run")
    .into_inner()
    .run
    .expect("a created run")
}

/// CPU used by the manager while the test held its sockets: a spinning accept loop
/// takes a whole core, so anything near the wall time fails.
fn assert_not_spinning(pid: i32, cpu_before: Duration, started: Instant) {
    let (cpu, wall) = (cpu_time(pid) - cpu_before, started.elapsed());
    assert!(
        cpu < wall / 2,
        "the manager used {cpu:?} of CPU in {wall:?} while idle sockets were held"
    );
}

#[tokio::test]
async fn idle_sockets_past_the_connection_cap_are_closed_and_keyed_calls_get_through() {
    let url = fresh_database().await;
    let timeout = Duration::from_millis(1_000);
    let manager = secured_manager(
        &url,
        &[
            ("AGENTRUN_MAX_CONNECTIONS", "50"),
            ("AGENTRUN_HANDSHAKE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let key = key(&url, "acme", Role::Client).await;

    let (cpu_before, started) = (cpu_time(manager.pid()), Instant::now());
    // 50 are accepted and hold the cap; 10 wait in the listen backlog, as does the
    // keyed call's connection behind them.
    let mut sockets = idle_sockets(manager.addr, 60).await;
    let run = keyed_call_served(manager.addr, &key, Duration::from_secs(20)).await;
    assert_eq!(status_of(&run), RunStatus::Pending);
    // The first 50 go after one timeout, the 10 behind them after a second one; slack
    // for a small shared machine.
    assert_all_closed(&mut sockets, started + 2 * timeout + Duration::from_secs(8)).await;
    assert_not_spinning(manager.pid(), cpu_before, started);
}

#[tokio::test]
async fn out_of_descriptors_the_manager_backs_off_and_recovers() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[("AGENTRUN_HANDSHAKE_TIMEOUT_MS", "1000")]).await;
    let key = key(&url, "acme", Role::Client).await;
    // Warm the manager's database pool while descriptors are plentiful.
    keyed_call_served(manager.addr, &key, LONG).await;

    // Leave the manager 16 descriptors: 60 idle sockets exhaust them (EMFILE on accept).
    let pid = manager.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the manager's descriptors")
        .count() as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with no new limit only writes the current one into `limit`.
    let read = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) };
    assert_eq!(read, 0, "prlimit: {}", std::io::Error::last_os_error());
    limit.rlim_cur = open + 16;
    // SAFETY: prlimit reads `limit` and writes nothing (no old-limit pointer).
    let lowered = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(lowered, 0, "prlimit: {}", std::io::Error::last_os_error());

    let (cpu_before, started) = (cpu_time(pid), Instant::now());
    let mut sockets = idle_sockets(manager.addr, 60).await;
    // Served once the idle sockets' descriptors come back (16 per handshake timeout).
    keyed_call_served(manager.addr, &key, LONG).await;
    assert_all_closed(&mut sockets, Instant::now() + LONG).await;
    assert_not_spinning(pid, cpu_before, started);
}

#[tokio::test]
async fn the_manager_advertises_its_concurrent_stream_limit() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[("AGENTRUN_MAX_CONCURRENT_STREAMS", "7")]).await;
    let tcp = TcpStream::connect(manager.addr).await.expect("connect");
    let (_requests, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    // The limit arrives in the server's SETTINGS; driving the connection reads them.
    let advertised = tokio::time::timeout(
        Duration::from_secs(10),
        poll_fn(|cx| {
            if let Poll::Ready(ended) = Pin::new(&mut connection).poll(cx) {
                panic!("the connection ended: {ended:?}");
            }
            match connection.max_concurrent_send_streams() {
                7 => Poll::Ready(()),
                _ => Poll::Pending,
            }
        }),
    )
    .await;
    assert!(
        advertised.is_ok(),
        "SETTINGS_MAX_CONCURRENT_STREAMS 7 not advertised (the client may open {})",
        connection.max_concurrent_send_streams()
    );
}

/// Sends the request's bytes as they are, and takes the response's as they come.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// `message` encoded, with `marker` (which must occur once) replaced by as many bytes
/// that are not UTF-8: still well-formed protobuf, but a string field is not a string.
fn with_invalid_utf8(message: &impl Message, marker: &str) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("the marker is in the encoding");
    bytes[at..at + marker.len()].fill(0xff);
    bytes
}

/// Protobuf that does not decode: a varint that never ends.
const GARBAGE: [u8; 12] = [0xff; 12];

#[tokio::test]
async fn undecodable_requests_are_invalid_arguments_and_create_nothing() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let key = key(&url, "acme", Role::Client).await;
    let mut grpc = tonic::client::Grpc::new(lazy_channel(manager.addr));
    let path = PathAndQuery::from_static("/agentrun.v1.RunService/CreateRun");

    let not_utf8 = with_invalid_utf8(&run_request("MARKER"), "MARKER");
    for (what, body, names) in [
        ("garbage", GARBAGE.to_vec(), "varint"),
        ("invalid UTF-8", not_utf8, "UTF-8"),
    ] {
        grpc.ready().await.expect("channel ready");
        let status = grpc
            .unary(with_key(&key, body), path.clone(), RawCodec)
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(names),
            "{what}: the message should name the problem: {status:?}"
        );
    }
    let db = db_client(&url).await;
    let runs: i64 = db
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .expect("count runs")
        .get(0);
    assert_eq!(runs, 0, "an undecodable request created a run");
}

/// Opens the runner stream with a runner key, sends `messages` (raw), and returns the
/// status the stream ends with, or `None` when it ends without an error.
async fn connect_status(messages: Vec<Vec<u8>>) -> Option<tonic::Status> {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let key = key(&url, "acme", Role::Runner).await;
    let mut grpc = tonic::client::Grpc::new(lazy_channel(manager.addr));
    let path = PathAndQuery::from_static("/agentrun.v1.RunnerService/Connect");
    grpc.ready().await.expect("channel ready");
    let call = grpc.streaming(with_key(&key, tokio_stream_of(messages)), path, RawCodec);
    let ended = async {
        let mut stream = match call.await {
            Err(status) => return Some(status),
            Ok(response) => response.into_inner(),
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    tokio::time::timeout(LONG, ended)
        .await
        .expect("the runner stream ended")
}

/// A runner's hello, encoded.
fn hello_bytes() -> Vec<u8> {
    proto::RunnerMessage {
        body: Some(ToManager::Hello(proto::Hello {
            runner: Some(runner("abuse")),
            held_leases: vec![],
        })),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn an_undecodable_first_message_on_the_runner_stream_is_an_invalid_argument() {
    let status = connect_status(vec![GARBAGE.to_vec()])
        .await
        .expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("varint"), "{status:?}");
}

#[tokio::test]
async fn an_undecodable_message_mid_stream_ends_the_runner_stream_with_invalid_argument() {
    let status = connect_status(vec![hello_bytes(), GARBAGE.to_vec()])
        .await
        .expect("an error status, not a clean end");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("varint"), "{status:?}");
}

/// The items, then a stream that stays open (as a runner's would).
fn tokio_stream_of(
    items: Vec<Vec<u8>>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = Vec<u8>> + Send + 'static {
    let (tx, rx) = mpsc::channel(items.len().max(1));
    for item in items {
        tx.try_send(item).expect("room for every item");
    }
    // Keep the sender alive with the stream so the request does not end.
    tokio::spawn(async move {
        tx.closed().await;
    });
    ReceiverStream::new(rx)
}
