//! Following against a scripted fake RunService, to exercise what a real manager does
//! only under faults: a WatchRun stream that breaks mid-way (and a server that repeats
//! an event on resume), and the ListEvents fallback with an UNAVAILABLE in between.
//! Each event must be printed exactly once and the cursor must resume where it left.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use agentrun_cli::client::Manager;
use agentrun_cli::follow::{Followed, follow};
use agentrun_cli::render::{Format, Printer};
use agentrun_shared::proto::{
    self, run_service_server::RunService, run_service_server::RunServiceServer,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const RUN_ID: &str = "01a1fe13-0000-7000-8000-000000000001";
const LAST_SEQ: i64 = 5;

/// The run's log: four reply deltas, then the terminal event.
fn event(seq: i64) -> proto::Event {
    let (event_type, payload) = if seq == LAST_SEQ {
        (
            "run.terminal",
            json!({"status": "failed", "failure_kind": "provider_error", "message": "boom"}),
        )
    } else {
        (
            "content.delta",
            json!({"kind": "assistant_text", "delta": format!("{seq} ")}),
        )
    };
    proto::Event {
        run_id: RUN_ID.into(),
        seq,
        r#type: event_type.into(),
        payload_json: payload.to_string(),
        ..Default::default()
    }
}

/// What the fake manager does and what it was asked (shared with the test).
#[derive(Default, Clone)]
struct Fake {
    /// WatchRun answers UNIMPLEMENTED, as the manager does today.
    no_watch: bool,
    /// `after_seq` of every WatchRun / ListEvents call, in order.
    cursors: Arc<Mutex<Vec<i64>>>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

fn unused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not used by this test"))
}

#[tonic::async_trait]
impl RunService for Fake {
    async fn create_run(
        &self,
        _: Request<proto::CreateRunRequest>,
    ) -> Result<Response<proto::CreateRunResponse>, Status> {
        unused()
    }
    async fn create_runs(
        &self,
        _: Request<proto::CreateRunsRequest>,
    ) -> Result<Response<proto::CreateRunsResponse>, Status> {
        unused()
    }
    async fn get_run(
        &self,
        _: Request<proto::GetRunRequest>,
    ) -> Result<Response<proto::GetRunResponse>, Status> {
        unused()
    }
    async fn list_runs(
        &self,
        _: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        unused()
    }
    async fn cancel_run(
        &self,
        _: Request<proto::CancelRunRequest>,
    ) -> Result<Response<proto::CancelRunResponse>, Status> {
        unused()
    }
    async fn send_command(
        &self,
        _: Request<proto::SendCommandRequest>,
    ) -> Result<Response<proto::SendCommandResponse>, Status> {
        unused()
    }
    async fn list_commands(
        &self,
        _: Request<proto::ListCommandsRequest>,
    ) -> Result<Response<proto::ListCommandsResponse>, Status> {
        unused()
    }
    async fn resolve_request(
        &self,
        _: Request<proto::ResolveRequestRequest>,
    ) -> Result<Response<proto::ResolveRequestResponse>, Status> {
        unused()
    }

    async fn cancel_command(
        &self,
        _: Request<proto::CancelCommandRequest>,
    ) -> Result<Response<proto::CancelCommandResponse>, Status> {
        unused()
    }

    async fn get_command(
        &self,
        _: Request<proto::GetCommandRequest>,
    ) -> Result<Response<proto::GetCommandResponse>, Status> {
        unused()
    }
    async fn list_requests(
        &self,
        _: Request<proto::ListRequestsRequest>,
    ) -> Result<Response<proto::ListRequestsResponse>, Status> {
        unused()
    }
    async fn rerun_run(
        &self,
        _: Request<proto::RerunRunRequest>,
    ) -> Result<Response<proto::RerunRunResponse>, Status> {
        unused()
    }
    async fn fork_run(
        &self,
        _: Request<proto::ForkRunRequest>,
    ) -> Result<Response<proto::ForkRunResponse>, Status> {
        unused()
    }
    async fn cancel_runs(
        &self,
        _: Request<proto::CancelRunsRequest>,
    ) -> Result<Response<proto::CancelRunsResponse>, Status> {
        unused()
    }

    /// Two events per page; the second call fails with UNAVAILABLE.
    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let after = request.get_ref().after_seq;
        let call = {
            let mut cursors = self.cursors.lock().unwrap();
            cursors.push(after);
            cursors.len()
        };
        if call == 2 {
            return Err(Status::unavailable("manager restarting"));
        }
        let events: Vec<proto::Event> = (after + 1..=LAST_SEQ).take(2).map(event).collect();
        let end_of_run = events.last().is_some_and(|e| e.seq == LAST_SEQ);
        Ok(Response::new(proto::ListEventsResponse {
            events,
            last_seq: LAST_SEQ,
            end_of_run,
        }))
    }

    type WatchRunStream = EventStream;

    /// First stream: events up to 3, then the connection "breaks". Later streams resume
    /// one event early (a duplicate the client must drop) and run to the end.
    async fn watch_run(
        &self,
        request: Request<proto::WatchRunRequest>,
    ) -> Result<Response<EventStream>, Status> {
        if self.no_watch {
            return Err(Status::unimplemented("WatchRun is not implemented yet"));
        }
        let after = request.get_ref().after_seq;
        let first = {
            let mut cursors = self.cursors.lock().unwrap();
            cursors.push(after);
            cursors.len() == 1
        };
        let items: Vec<Result<proto::Event, Status>> = if first {
            (after + 1..=3)
                .map(|seq| Ok(event(seq)))
                .chain([Err(Status::unavailable("connection reset"))])
                .collect()
        } else {
            (after.max(1)..=LAST_SEQ)
                .map(|seq| Ok(event(seq)))
                .collect()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

async fn serve(fake: Fake) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// Follows the fake's run; returns the outcome, stdout and stderr.
async fn follow_fake(fake: Fake, format: Format) -> (Followed, String, String) {
    let addr = serve(fake).await;
    let mut manager = Manager::connect(&format!("http://{addr}"), None)
        .await
        .unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut printer = Printer::new(format, &mut out, &mut err, false, false);
    let followed = follow(
        &mut manager,
        RUN_ID,
        0,
        &mut printer,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    drop(printer);
    (
        followed,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[tokio::test]
async fn a_broken_watch_stream_resumes_after_the_last_printed_seq() {
    let fake = Fake::default();
    let (followed, out, err) = follow_fake(fake.clone(), Format::Json).await;

    let seqs: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "each event once, in order");
    assert_eq!(
        *fake.cursors.lock().unwrap(),
        [0, 3],
        "resumed after the last printed seq"
    );
    assert!(err.contains("retrying"), "the retry is reported: {err}");
    let Followed::Ended(terminal) = followed else {
        panic!("following ended without the run: {followed:?}");
    };
    assert_eq!(
        (terminal.status.as_str(), terminal.message.as_str()),
        ("failed", "boom")
    );
    assert!(!terminal.completed());
}

#[tokio::test]
async fn without_watch_run_the_log_is_polled_through_an_outage() {
    let fake = Fake {
        no_watch: true,
        ..Default::default()
    };
    let (followed, out, err) = follow_fake(fake.clone(), Format::Human).await;

    assert_eq!(out, "1 2 3 4 ", "the reply, streamed once");
    assert!(
        err.contains("run.terminal failed (provider_error: boom)"),
        "{err}"
    );
    // Pages of two; the failed second call is retried from the same cursor.
    assert_eq!(*fake.cursors.lock().unwrap(), [0, 2, 2, 4]);
    assert!(matches!(followed, Followed::Ended(t) if t.status == "failed"));
}
