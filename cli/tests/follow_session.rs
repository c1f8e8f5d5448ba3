//! Following a session against a scripted fake SessionService, to exercise what a real
//! manager does only under faults: a WatchSession stream that breaks mid-way across two
//! runs (and a server that repeats an event on resume), and the ListSessionEvents
//! fallback. Each event must be printed exactly once, the cursor must resume at the
//! last (run, seq) printed, and following ends only on Ctrl-C.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentrun_cli::client::Manager;
use agentrun_cli::follow::{Follower, SessionCursor, follow_session};
use agentrun_cli::render::{Format, Printer};
use agentrun_shared::proto::{
    self, session_service_server::SessionService, session_service_server::SessionServiceServer,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const SESSION_ID: &str = "01a1fe13-0000-7000-8000-0000000000aa";
const RUN_A: &str = "01a1fe13-0000-7000-8000-000000000001";
const RUN_B: &str = "01a1fe13-0000-7000-8000-000000000002";

/// The session's log: run A replies and ends, run B replies "b1 end".
fn log() -> Vec<proto::Event> {
    let delta = |run: &str, seq: i64, text: &str| proto::Event {
        run_id: run.into(),
        seq,
        r#type: "content.delta".into(),
        payload_json: json!({"kind": "assistant_text", "delta": text}).to_string(),
        ..Default::default()
    };
    vec![
        delta(RUN_A, 1, "a1 "),
        delta(RUN_A, 2, "a2"),
        proto::Event {
            run_id: RUN_A.into(),
            seq: 3,
            r#type: "run.terminal".into(),
            payload_json: json!({"status": "completed"}).to_string(),
            ..Default::default()
        },
        delta(RUN_B, 1, "b1 "),
        delta(RUN_B, 2, "end"),
    ]
}

/// The events after a (run, seq) cursor.
fn after(run_id: &str, seq: i64) -> Vec<proto::Event> {
    log()
        .into_iter()
        .filter(|e| (e.run_id.as_str(), e.seq) > (run_id, seq))
        .collect()
}

#[derive(Default, Clone)]
struct Fake {
    /// WatchSession answers UNIMPLEMENTED.
    no_watch: bool,
    /// The (after_run_id, after_seq) of every WatchSession / ListSessionEvents call.
    cursors: Arc<Mutex<Vec<(String, i64)>>>,
}

type SessionEvents = Pin<Box<dyn Stream<Item = Result<proto::SessionEvent, Status>> + Send>>;

fn unused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not used by this test"))
}

#[tonic::async_trait]
impl SessionService for Fake {
    async fn get_session(
        &self,
        _: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::GetSessionResponse>, Status> {
        unused()
    }
    async fn list_sessions(
        &self,
        _: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        unused()
    }
    async fn mark_session_read(
        &self,
        _: Request<proto::MarkSessionReadRequest>,
    ) -> Result<Response<proto::MarkSessionReadResponse>, Status> {
        unused()
    }
    async fn set_session_title(
        &self,
        _: Request<proto::SetSessionTitleRequest>,
    ) -> Result<Response<proto::SetSessionTitleResponse>, Status> {
        unused()
    }

    /// Two events per page; the second call fails with UNAVAILABLE.
    async fn list_session_events(
        &self,
        request: Request<proto::ListSessionEventsRequest>,
    ) -> Result<Response<proto::ListSessionEventsResponse>, Status> {
        let r = request.into_inner();
        let call = {
            let mut cursors = self.cursors.lock().unwrap();
            cursors.push((r.after_run_id.clone(), r.after_seq));
            cursors.len()
        };
        if call == 2 {
            return Err(Status::unavailable("manager restarting"));
        }
        let events = after(&r.after_run_id, r.after_seq)
            .into_iter()
            .take(2)
            .collect();
        Ok(Response::new(proto::ListSessionEventsResponse { events }))
    }

    type WatchSessionStream = SessionEvents;

    /// First stream: up to run B's first event, then the connection "breaks". Later
    /// streams resume one event early (a duplicate the client must drop), send the rest
    /// and stay open, as a session's stream does.
    async fn watch_session(
        &self,
        request: Request<proto::WatchSessionRequest>,
    ) -> Result<Response<SessionEvents>, Status> {
        if self.no_watch {
            return Err(Status::unimplemented("WatchSession is not implemented yet"));
        }
        let r = request.into_inner();
        let first = {
            let mut cursors = self.cursors.lock().unwrap();
            cursors.push((r.after_run_id.clone(), r.after_seq));
            cursors.len() == 1
        };
        let message = |event: proto::Event| {
            Ok(proto::SessionEvent {
                event: Some(event),
                session_version: 3,
            })
        };
        let stream: SessionEvents = if first {
            let items: Vec<_> = after(&r.after_run_id, r.after_seq)
                .into_iter()
                .take(4)
                .map(message)
                .chain([Err(Status::unavailable("connection reset"))])
                .collect();
            Box::pin(tokio_stream::iter(items))
        } else {
            let mut events = after(&r.after_run_id, r.after_seq);
            let all = log();
            let repeated = all
                .iter()
                .position(|e| e.run_id == r.after_run_id && e.seq == r.after_seq)
                .map(|i| all[i].clone());
            events.splice(0..0, repeated);
            let items: Vec<_> = events.into_iter().map(message).collect();
            Box::pin(tokio_stream::StreamExt::chain(
                tokio_stream::iter(items),
                tokio_stream::pending(),
            ))
        };
        Ok(Response::new(stream))
    }
}

async fn serve(fake: Fake) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SessionServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// A writer the test can read while the follower writes.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Follows the fake's session until the whole reply is printed, then "presses Ctrl-C";
/// returns the final cursor, stdout and stderr.
async fn follow_fake(fake: Fake) -> (SessionCursor, String, String) {
    let addr = serve(fake).await;
    let mut manager = Manager::connect(&format!("http://{addr}"), None)
        .await
        .unwrap();
    let (out, err) = (Shared::default(), Shared::default());
    let mut printer = Printer::new(Format::Human, out.clone(), err.clone(), false, false);
    let mut follower = Follower::new(&mut printer);
    let shutdown = CancellationToken::new();
    let interrupt = {
        let (out, shutdown) = (out.clone(), shutdown.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !out.text().ends_with("end") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            shutdown.cancel();
        })
    };
    let mut cursor = SessionCursor::default();
    follow_session(
        &mut manager,
        SESSION_ID,
        false,
        &mut cursor,
        &mut follower,
        &shutdown,
    )
    .await
    .unwrap();
    interrupt.await.unwrap();
    drop(printer);
    (cursor, out.text(), err.text())
}

fn at(run_id: &str, seq: i64) -> (String, i64) {
    (run_id.to_owned(), seq)
}

#[tokio::test]
async fn a_broken_session_stream_resumes_after_the_last_printed_event() {
    let fake = Fake::default();
    let (cursor, out, err) = follow_fake(fake.clone()).await;

    assert_eq!(
        out, "a1 a2\nb1 end\n",
        "each event once, each run on its line"
    );
    assert_eq!(
        *fake.cursors.lock().unwrap(),
        [at("", 0), at(RUN_B, 1)],
        "resumed after the last (run, seq) printed"
    );
    assert_eq!((cursor.run_id.as_str(), cursor.seq), (RUN_B, 2));
    assert!(err.contains("retrying"), "the retry is reported: {err}");
    assert!(err.contains(&format!("── run {RUN_A}")), "{err}");
    assert!(err.contains(&format!("── run {RUN_B}")), "{err}");
}

#[tokio::test]
async fn without_watch_session_the_log_is_polled_through_an_outage() {
    let fake = Fake {
        no_watch: true,
        ..Default::default()
    };
    let (cursor, out, _) = follow_fake(fake.clone()).await;

    assert_eq!(out, "a1 a2\nb1 end\n");
    assert_eq!((cursor.run_id.as_str(), cursor.seq), (RUN_B, 2));
    // Pages of two; the failed second call is retried from the same cursor.
    let cursors = fake.cursors.lock().unwrap().clone();
    assert_eq!(
        cursors[..4],
        [at("", 0), at(RUN_A, 2), at(RUN_A, 2), at(RUN_B, 1)]
    );
}
