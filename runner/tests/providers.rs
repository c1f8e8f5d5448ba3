//! The three providers driven through the `Provider` trait, as the executor drives them:
//! events checked against the event rules, steering, stopping and failure
//! classification. The `openai` tests talk to a hand-written HTTP/1.1 server on
//! 127.0.0.1; the `command` tests run small `sh` scripts as the agent CLI.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentrun_runner::provider::command::{CommandConfig, CommandProvider};
use agentrun_runner::provider::openai::{OpenAiConfig, OpenAiProvider};
use agentrun_runner::provider::scripted::{ScriptedConfig, ScriptedProvider};
use agentrun_runner::provider::{
    Exchange, Provider, ProviderEvent, Resolution, TurnContext, TurnOutcome, TurnRequest, Usage,
};
use agentrun_shared::events::EventType;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest any single expected thing may take, however loaded the machine.
const DEADLINE: Duration = Duration::from_secs(10);
/// How soon a provider must return after stop (the contract says "promptly").
const STOP_WITHIN: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A provider's event with its payload as JSON, as the tests read it.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    event_type: &'static str,
    payload: Value,
}

impl From<ProviderEvent> for Event {
    fn from(event: ProviderEvent) -> Self {
        Event {
            event_type: event.event_type,
            payload: event.payload_value(),
        }
    }
}

/// Fails unless `event` is one a runner may write, with a payload its type accepts.
fn assert_valid(event: &Event) {
    let event_type = EventType::parse("event_type", event.event_type)
        .unwrap_or_else(|e| panic!("{event:?}: {e:?}"));
    assert!(
        event_type.runner_may_write(),
        "{event:?}: runners may not write this type"
    );
    assert!(
        !matches!(
            event_type,
            EventType::TurnStarted | EventType::TurnCompleted
        ),
        "{event:?}: turn events are the executor's"
    );
    let payload = event
        .payload
        .as_object()
        .unwrap_or_else(|| panic!("{event:?}: the payload must be an object"));
    event_type
        .validate_payload("payload", payload)
        .unwrap_or_else(|e| panic!("{event:?}: {e:?}"));
}

fn request(backend_profile: &str, prompt: &str) -> TurnRequest {
    TurnRequest {
        run_id: "run-1".into(),
        turn_id: "turn-1".into(),
        backend_profile: backend_profile.into(),
        prompt: prompt.into(),
        history: Vec::new(),
        provider_thread_id: None,
    }
}

/// A turn running in its own task, with the executor's ends of its channels.
struct Running {
    events: mpsc::Receiver<ProviderEvent>,
    steer: mpsc::Sender<String>,
    resolutions: mpsc::Sender<Resolution>,
    stop: CancellationToken,
    outcome: JoinHandle<TurnOutcome>,
    /// Every event received so far, each checked by [`assert_valid`].
    seen: Vec<Event>,
}

fn start(provider: impl Provider + 'static, turn: TurnRequest) -> Running {
    let (events_tx, events) = mpsc::channel(256);
    let (steer, steer_rx) = mpsc::channel(16);
    let (resolutions, resolutions_rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let ctx = TurnContext {
        events: events_tx,
        steer: steer_rx,
        resolutions: resolutions_rx,
        stop: stop.clone(),
    };
    let provider: Arc<dyn Provider> = Arc::new(provider);
    let outcome = tokio::spawn(async move { provider.run_turn(turn, ctx).await });
    Running {
        events,
        steer,
        resolutions,
        stop,
        outcome,
        seen: Vec::new(),
    }
}

impl Running {
    /// The next event; `None` once the provider returned and dropped its sender.
    async fn next_event(&mut self) -> Option<Event> {
        let event: Event = tokio::time::timeout(DEADLINE, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {DEADLINE:?}; seen {:#?}", self.seen))?
            .into();
        assert_valid(&event);
        self.seen.push(event.clone());
        Some(event)
    }

    /// Waits for the first event matching `wanted`.
    async fn wait_for(&mut self, wanted: impl Fn(&Event) -> bool) -> Event {
        loop {
            match self.next_event().await {
                Some(event) if wanted(&event) => return event,
                Some(_) => {}
                None => panic!("the turn ended first; seen {:#?}", self.seen),
            }
        }
    }

    /// Reads the remaining events and the outcome.
    async fn finish(mut self) -> (TurnOutcome, Vec<Event>) {
        while self.next_event().await.is_some() {}
        let outcome = tokio::time::timeout(DEADLINE, self.outcome)
            .await
            .expect("the turn ended")
            .expect("the provider did not panic");
        (outcome, self.seen)
    }

    /// Fires stop and returns the outcome and how long the provider took to return.
    async fn stop(self) -> (TurnOutcome, Duration, Vec<Event>) {
        let asked = Instant::now();
        self.stop.cancel();
        let mut outcome = self.outcome;
        let result = tokio::time::timeout(DEADLINE, &mut outcome)
            .await
            .expect("the turn ended after stop")
            .expect("the provider did not panic");
        let took = asked.elapsed();
        let mut events = self.events;
        let mut seen = self.seen;
        while let Some(event) = events.recv().await {
            let event = Event::from(event);
            assert_valid(&event);
            seen.push(event);
        }
        (result, took, seen)
    }
}

fn is_delta(event: &Event, kind: &str) -> bool {
    event.event_type == "content.delta" && event.payload["kind"] == kind
}

fn deltas(events: &[Event], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| is_delta(e, kind))
        .map(|e| e.payload["delta"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.event_type).collect()
}

fn completed(outcome: TurnOutcome) -> (String, Option<Usage>) {
    match outcome {
        TurnOutcome::Completed { reply, usage, .. } => (reply, usage),
        other => panic!("expected Completed, got {other:?}"),
    }
}

fn failed(outcome: TurnOutcome) -> agentrun_runner::provider::ProviderError {
    match outcome {
        TurnOutcome::Failed(error) => error,
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// The last event is the `runtime.error` describing `error`.
fn assert_error_reported(events: &[Event], error: &agentrun_runner::provider::ProviderError) {
    let last = events.last().expect("events were emitted");
    assert_eq!(last.event_type, "runtime.error", "{events:#?}");
    assert_eq!(last.payload["message"], error.message.as_str());
    assert_eq!(last.payload["kind"], error.kind.as_str());
    assert_eq!(last.payload["retryable"], error.retryable);
}

// ---------------------------------------------------------------------------------------
// scripted
// ---------------------------------------------------------------------------------------

fn scripted(token_delay_ms: u64) -> ScriptedProvider {
    ScriptedProvider::new(ScriptedConfig {
        token_delay: Duration::from_millis(token_delay_ms),
    })
}

#[tokio::test]
async fn scripted_echoes_the_prompt_word_by_word() {
    let turn = start(scripted(1), request("scripted", "hi there"));
    let (outcome, events) = turn.finish().await;
    let expected = "Hello! You said: hi there. This reply comes from the scripted provider.";
    let (reply, usage) = completed(outcome);
    assert_eq!(reply, expected);
    let words = expected.split_whitespace().count() as u64;
    assert_eq!(
        usage,
        Some(Usage {
            input_tokens: 2,
            output_tokens: words
        })
    );
    let texts = deltas(&events, "assistant_text");
    assert_eq!(texts.len() as u64, words);
    assert_eq!(texts.concat(), expected);
    assert_eq!(events.first().map(|e| e.event_type), Some("item.started"));
    let item_id = &events[0].payload["item_id"];
    assert!(
        events
            .iter()
            .filter(|e| e.event_type != "usage.updated")
            .all(|e| &e.payload["item_id"] == item_id)
    );
    let n = events.len();
    assert_eq!(types(&events[n - 2..]), ["item.completed", "usage.updated"]);
    assert_eq!(events[n - 2].payload["text"], expected);
    assert_eq!(
        events[n - 1].payload,
        json!({"input_tokens": 2, "output_tokens": words})
    );
}

#[tokio::test]
async fn scripted_streams_exactly_the_tokens_asked_for() {
    let turn = start(scripted(0), request("scripted", "bench [tokens:500]"));
    let (outcome, events) = turn.finish().await;
    let (reply, usage) = completed(outcome);
    let texts = deltas(&events, "assistant_text");
    assert_eq!(texts.len(), 500);
    assert_eq!(texts[0], "token1");
    assert_eq!(texts[1], " token2");
    assert_eq!(
        reply,
        (1..=500)
            .map(|i| format!("token{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(usage.map(|u| u.output_tokens), Some(500));
}

#[tokio::test]
async fn scripted_fails_on_cue_after_a_few_tokens() {
    let turn = start(scripted(1), request("scripted", "please [fail]"));
    let (outcome, events) = turn.finish().await;
    let error = failed(outcome);
    assert_eq!(error.kind, "scripted_failure");
    assert!(!error.retryable);
    assert!(!deltas(&events, "assistant_text").is_empty());
    assert_error_reported(&events, &error);
}

#[tokio::test]
async fn scripted_stalls_until_stopped() {
    let mut turn = start(scripted(1), request("scripted", "[stall]"));
    let first = turn.next_event().await.expect("an event");
    assert_eq!(first.event_type, "item.started");
    // Nothing more comes while stalled (a bounded look, not a wait for a condition).
    let more = tokio::time::timeout(Duration::from_millis(200), turn.events.recv()).await;
    assert!(more.is_err(), "a stalled turn emitted {more:?}");
    let (outcome, took, events) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(took < STOP_WITHIN, "stop took {took:?}");
    assert_eq!(events.len(), 1);
}

#[tokio::test]
async fn scripted_slow_reply_stops_promptly_mid_stream() {
    let mut turn = start(scripted(20), request("scripted", "[slow]"));
    turn.wait_for(|e| is_delta(e, "assistant_text")).await;
    let (outcome, took, events) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(took < STOP_WITHIN, "stop took {took:?}");
    let streamed = deltas(&events, "assistant_text").len();
    assert!(
        streamed < 200,
        "the whole reply streamed ({streamed} tokens) before stop"
    );
}

#[tokio::test]
async fn scripted_slow_reply_is_two_hundred_tokens() {
    let turn = start(scripted(0), request("scripted", "[slow]"));
    let (outcome, events) = turn.finish().await;
    let (_, usage) = completed(outcome);
    assert_eq!(deltas(&events, "assistant_text").len(), 200);
    assert_eq!(usage.map(|u| u.output_tokens), Some(200));
}

#[tokio::test]
async fn scripted_steer_reaches_the_active_turn() {
    let mut turn = start(scripted(10), request("scripted", "[tokens:40]"));
    turn.wait_for(|e| is_delta(e, "assistant_text")).await;
    turn.steer
        .send("go left".into())
        .await
        .expect("the turn takes steers");
    turn.wait_for(|e| {
        is_delta(e, "assistant_text")
            && e.payload["delta"]
                .as_str()
                .is_some_and(|d| d.contains("[steer: go left]"))
    })
    .await;
    let (outcome, events) = turn.finish().await;
    let (reply, usage) = completed(outcome);
    assert!(reply.contains("[steer: go left]"), "{reply}");
    assert!(reply.ends_with("token40"), "{reply}");
    assert_eq!(deltas(&events, "assistant_text").concat(), reply);
    assert_eq!(usage.map(|u| u.output_tokens), Some(40));
}

#[tokio::test]
async fn scripted_approval_waits_for_the_answer() {
    let mut turn = start(scripted(1), request("scripted", "clean up [approval]"));
    let opened = turn.wait_for(|e| e.event_type == "request.opened").await;
    assert_eq!(opened.payload["kind"], "command");
    assert_eq!(opened.payload["detail"], json!({"command": "rm -rf build"}));
    assert_eq!(opened.payload["options"], json!(["accept", "decline"]));
    let request_id = opened.payload["request_id"].as_str().expect("a request id");
    let parsed = uuid::Uuid::parse_str(request_id).expect("a uuid");
    assert_eq!(parsed.get_version_num(), 4);
    // A steer is not an answer, nor is the resolution of another request.
    turn.steer
        .send("accept".into())
        .await
        .expect("the turn takes steers");
    turn.resolutions
        .send(Resolution {
            request_id: uuid::Uuid::new_v4().to_string(),
            decision: "decline".into(),
            ..Default::default()
        })
        .await
        .expect("the turn takes resolutions");
    turn.resolutions
        .send(Resolution {
            request_id: request_id.to_owned(),
            decision: "accept".into(),
            ..Default::default()
        })
        .await
        .expect("the turn takes resolutions");
    let (outcome, events) = turn.finish().await;
    let (reply, _) = completed(outcome);
    // The steer that arrived while waiting is echoed in the reply, not taken as the answer.
    assert_eq!(reply, "[steer: accept] Approval: accept");
    // Resolving is the manager's to record; the provider only opens.
    assert!(
        events.iter().all(|e| e.event_type != "request.resolved"),
        "{events:?}"
    );
    let requests: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "request.opened")
        .collect();
    assert_eq!(requests.len(), 1, "{events:?}");
    assert_eq!(requests[0].payload["request_id"], request_id);
}

#[tokio::test]
async fn scripted_user_input_sees_the_answers() {
    let mut turn = start(scripted(1), request("scripted", "[input]"));
    let opened = turn.wait_for(|e| e.event_type == "request.opened").await;
    assert_eq!(opened.payload["kind"], "user_input");
    let request_id = opened.payload["request_id"].as_str().unwrap().to_owned();
    turn.resolutions
        .send(Resolution::from_payload(&json!({
            "request_id": request_id,
            "decision": "accept",
            "answers": {"next": "ship"},
        })))
        .await
        .unwrap();
    let (reply, _) = completed(turn.finish().await.0);
    assert_eq!(reply, r#"Input: accept answers {"next":"ship"}"#);
}

#[tokio::test]
async fn scripted_gate_goes_on_when_accepted_and_blocks_when_declined() {
    for (decision, accepted) in [("accept", true), ("decline", false), ("expired", false)] {
        let mut turn = start(scripted(1), request("scripted", "[gate] deploy to prod"));
        let opened = turn.wait_for(|e| e.event_type == "request.opened").await;
        assert_eq!(opened.payload["detail"]["gate"], "deploy to prod");
        let request_id = opened.payload["request_id"].as_str().unwrap().to_owned();
        turn.resolutions
            .send(Resolution {
                request_id,
                decision: decision.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let (outcome, _) = turn.finish().await;
        if accepted {
            assert_eq!(completed(outcome).0, "Gate passed: deploy to prod");
        } else {
            assert_eq!(
                outcome,
                TurnOutcome::Blocked {
                    reason: "deploy to prod".into()
                },
                "{decision}"
            );
        }
    }
}

#[tokio::test]
async fn scripted_big_reply_streams_exactly_the_bytes_asked_for() {
    let (outcome, events) = start(scripted(0), request("scripted", "[big:40000]"))
        .finish()
        .await;
    let (reply, _) = completed(outcome);
    assert_eq!(reply.len(), 40_000);
    assert_eq!(deltas(&events, "assistant_text").concat(), reply);
    assert_eq!(deltas(&events, "assistant_text").len(), 3);
}

#[tokio::test]
async fn scripted_approval_can_be_stopped() {
    let mut turn = start(scripted(1), request("scripted", "[approval]"));
    turn.wait_for(|e| e.event_type == "request.opened").await;
    let (outcome, took, _) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(took < STOP_WITHIN, "stop took {took:?}");
}

// ---------------------------------------------------------------------------------------
// openai: a hand-written HTTP/1.1 server
// ---------------------------------------------------------------------------------------

/// One step of a scripted HTTP response.
#[derive(Clone)]
enum Step {
    /// The status line and headers; `text/event-stream` bodies use chunked encoding.
    Head {
        status: u16,
        content_type: &'static str,
    },
    /// One more header line (after `Head` of a non-streamed response, before `Body`).
    Header(&'static str),
    /// Raw body bytes, sent (and flushed) as one HTTP chunk.
    Chunk(String),
    /// A whole non-chunked body (for error responses; sets content-length).
    Body(String),
    Pause(Duration),
    /// Waits until the test notifies.
    Gate(Arc<Notify>),
    /// The terminating zero-length chunk.
    End,
    /// Closes the socket at once, mid-body.
    Abort,
    /// Reads until the client closes the connection and reports it.
    AwaitClientClose,
}

/// A request as the server saw it.
struct Seen {
    /// Request line and headers, as sent.
    head: String,
    body: Value,
}

struct TestServer {
    base_url: String,
    requests: mpsc::Receiver<Seen>,
    client_closed: mpsc::Receiver<()>,
}

/// Serves one scripted response per connection, in order.
async fn serve(responses: Vec<Vec<Step>>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (seen_tx, requests) = mpsc::channel(16);
    let (closed_tx, client_closed) = mpsc::channel(16);
    tokio::spawn(async move {
        for steps in responses {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let seen_tx = seen_tx.clone();
            let closed_tx = closed_tx.clone();
            tokio::spawn(respond(socket, steps, seen_tx, closed_tx));
        }
    });
    TestServer {
        base_url: format!("http://{addr}/v1/"),
        requests,
        client_closed,
    }
}

async fn respond(
    mut socket: TcpStream,
    steps: Vec<Step>,
    seen: mpsc::Sender<Seen>,
    closed: mpsc::Sender<()>,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.expect("read request");
        assert!(n > 0, "the client closed before sending a request");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "the client closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + length]).expect("a JSON body");
    let _ = seen.send(Seen { head, body }).await;

    for step in steps {
        let written = match step {
            Step::Head {
                status,
                content_type,
            } => {
                let framing = if content_type == "text/event-stream" {
                    "transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
                } else {
                    ""
                };
                let head = format!(
                    "HTTP/1.1 {status} Whatever\r\ncontent-type: {content_type}\r\n{framing}connection: close\r\n"
                );
                // The blank line ends the head here, except before a fixed-length body.
                let head = if framing.is_empty() {
                    head
                } else {
                    head + "\r\n"
                };
                socket.write_all(head.as_bytes()).await
            }
            Step::Header(line) => socket.write_all(format!("{line}\r\n").as_bytes()).await,
            Step::Chunk(data) => {
                let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                socket.write_all(chunk.as_bytes()).await
            }
            Step::Body(data) => {
                let rest = format!("content-length: {}\r\n\r\n{data}", data.len());
                socket.write_all(rest.as_bytes()).await
            }
            Step::Pause(pause) => {
                tokio::time::sleep(pause).await;
                Ok(())
            }
            Step::Gate(gate) => {
                gate.notified().await;
                Ok(())
            }
            Step::End => socket.write_all(b"0\r\n\r\n").await,
            Step::Abort => return,
            Step::AwaitClientClose => {
                let mut sink = [0u8; 1024];
                loop {
                    match socket.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let _ = closed.send(()).await;
                return;
            }
        };
        if written.is_err() {
            return;
        }
        let _ = socket.flush().await;
    }
}

fn sse_head() -> Step {
    Step::Head {
        status: 200,
        content_type: "text/event-stream",
    }
}

/// One SSE event carrying `data`, flushed on its own after a short pause.
fn data(json: &str) -> [Step; 2] {
    [
        Step::Pause(Duration::from_millis(5)),
        Step::Chunk(format!("data: {json}\n\n")),
    ]
}

fn delta_chunk(text: &str) -> String {
    json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}).to_string()
}

fn finish_chunk(reason: &str) -> String {
    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}).to_string()
}

fn usage_chunk(prompt: u64, completion: u64) -> String {
    json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}).to_string()
}

/// An openai provider that does not retry (each test server answers a fixed number of
/// requests).
fn openai(base_url: &str) -> OpenAiProvider {
    openai_retrying(base_url, 0)
}

fn openai_retrying(base_url: &str, max_retries: u32) -> OpenAiProvider {
    OpenAiProvider::new(OpenAiConfig {
        base_url: base_url.into(),
        api_key: Some("sk-test".into()),
        default_model: "default-model".into(),
        request_timeout: Duration::from_secs(10),
        max_retries,
        retry_base_delay: Duration::from_millis(10),
    })
    .expect("a valid config")
}

fn error_response(status: u16, body: &str) -> Vec<Step> {
    vec![
        Step::Head {
            status,
            content_type: "application/json",
        },
        Step::Body(body.into()),
    ]
}

#[tokio::test]
async fn openai_streams_text_and_usage() {
    let hello = delta_chunk("Hello");
    let (hello_a, hello_b) = hello.split_at(20);
    let mut steps = vec![sse_head(), Step::Chunk(": keepalive\n\n".into())];
    steps.extend(data(
        &json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}).to_string(),
    ));
    // One event split across two network chunks, then two events in one chunk.
    steps.push(Step::Chunk(format!("data: {hello_a}")));
    steps.push(Step::Pause(Duration::from_millis(20)));
    steps.push(Step::Chunk(format!("{hello_b}\n\n")));
    steps.push(Step::Chunk(format!(
        "data: {}\n\ndata: {}\n\n",
        delta_chunk(", world"),
        finish_chunk("stop")
    )));
    steps.extend(data(&usage_chunk(12, 3)));
    steps.extend(data("[DONE]"));
    steps.push(Step::End);
    let mut server = serve(vec![steps]).await;

    let mut turn = request("openai:gpt-test", "and now?");
    turn.history = vec![Exchange {
        prompt: "hi".into(),
        reply: "hello!".into(),
    }];
    let (outcome, events) = start(openai(&server.base_url), turn).finish().await;
    let (reply, usage) = completed(outcome);
    assert_eq!(reply, "Hello, world");
    assert_eq!(
        usage,
        Some(Usage {
            input_tokens: 12,
            output_tokens: 3
        })
    );
    assert_eq!(
        types(&events),
        [
            "item.started",
            "content.delta",
            "content.delta",
            "item.completed",
            "usage.updated"
        ]
    );
    assert_eq!(events[0].payload["kind"], "assistant_message");
    assert_eq!(deltas(&events, "assistant_text"), ["Hello", ", world"]);
    assert_eq!(events[3].payload["text"], "Hello, world");
    assert_eq!(events[3].payload["item_id"], events[0].payload["item_id"]);
    assert_eq!(
        events[4].payload,
        json!({"input_tokens": 12, "output_tokens": 3})
    );

    let seen = server.requests.recv().await.expect("a request");
    assert!(
        seen.head
            .starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{}",
        seen.head
    );
    let auth = seen
        .head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
        .expect("an authorization header");
    assert_eq!(
        auth.split_once(':').map(|(_, v)| v.trim()),
        Some("Bearer sk-test")
    );
    assert_eq!(seen.body["model"], "gpt-test");
    assert_eq!(seen.body["stream"], true);
    assert_eq!(seen.body["stream_options"]["include_usage"], true);
    assert_eq!(
        seen.body["messages"],
        json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "and now?"},
        ])
    );
}

#[tokio::test]
async fn openai_assembles_tool_calls() {
    let fragments = [
        json!([{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]),
        json!([{"index": 0, "function": {"arguments": "{\"city\":"}}]),
        json!([{"index": 0, "function": {"arguments": "\"Paris\"}"}}]),
        json!([{"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]),
    ];
    let mut steps = vec![sse_head()];
    for calls in fragments {
        steps.extend(data(
            &json!({"choices": [{"index": 0, "delta": {"content": null, "tool_calls": calls}, "finish_reason": null}]}).to_string(),
        ));
    }
    steps.extend(data(&finish_chunk("tool_calls")));
    steps.extend(data("[DONE]"));
    steps.push(Step::End);
    let server = serve(vec![steps]).await;

    let (outcome, events) = start(openai(&server.base_url), request("openai", "weather?"))
        .finish()
        .await;
    let (reply, usage) = completed(outcome);
    assert_eq!(reply, "");
    assert_eq!(usage, None);
    assert_eq!(
        types(&events),
        [
            "item.started",
            "item.updated",
            "item.updated",
            "item.started",
            "item.updated",
            "item.completed",
            "item.completed"
        ]
    );
    assert!(events.iter().all(|e| e.payload["kind"] == "tool_call"));
    let weather = &events[0].payload;
    assert_eq!(weather["name"], "get_weather");
    assert_eq!(weather["call_id"], "call_1");
    assert_eq!(events[1].payload["arguments_delta"], "{\"city\":");
    assert_eq!(events[3].payload["name"], "get_time");
    assert_ne!(events[3].payload["item_id"], weather["item_id"]);
    let done_weather = &events[5].payload;
    assert_eq!(done_weather["item_id"], weather["item_id"]);
    assert_eq!(done_weather["name"], "get_weather");
    assert_eq!(done_weather["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(events[6].payload["arguments"], "{}");
}

#[tokio::test]
async fn openai_stream_that_breaks_is_retryable() {
    let mut broken = vec![sse_head()];
    broken.extend(data(&delta_chunk("Hel")));
    broken.extend(data(&delta_chunk("lo")));
    broken.push(Step::Pause(Duration::from_millis(20)));
    broken.push(Step::Abort);
    // Also a stream that ends cleanly at the HTTP level but never says [DONE].
    let mut cut_short = vec![sse_head()];
    cut_short.extend(data(&delta_chunk("Hel")));
    cut_short.push(Step::End);

    for steps in [broken, cut_short] {
        let server = serve(vec![steps]).await;
        let (outcome, events) = start(openai(&server.base_url), request("openai", "hi"))
            .finish()
            .await;
        let error = failed(outcome);
        assert_eq!(error.kind, "stream", "{error:?}");
        assert!(error.retryable, "{error:?}");
        assert!(!deltas(&events, "assistant_text").is_empty());
        assert_error_reported(&events, &error);
    }
}

/// A reply that goes on and on (here 3 MiB of deltas) reaches the log whole, delta by
/// delta, but the provider keeps at most `MAX_REPLY_BYTES` of it for the turn's outcome:
/// a reply that never ends does not hold the runner's memory until the run's event quota
/// (1 GiB) stops it.
#[tokio::test]
async fn openai_keeps_a_bounded_reply_however_long_it_streams() {
    let piece = "y".repeat(32 * 1024);
    let mut steps = vec![sse_head()];
    steps.extend((0..96).map(|_| Step::Chunk(format!("data: {}\n\n", delta_chunk(&piece)))));
    steps.extend(data(&finish_chunk("stop")));
    steps.push(Step::Chunk("data: [DONE]\n\n".into()));
    steps.push(Step::End);
    let server = serve(vec![steps]).await;
    let (outcome, events) = start(openai(&server.base_url), request("openai", "hi"))
        .finish()
        .await;
    let (reply, _) = completed(outcome);
    assert_eq!(
        deltas(&events, "assistant_text").concat().len(),
        96 * piece.len()
    );
    assert_eq!(reply.len(), agentrun_runner::provider::MAX_REPLY_BYTES);
    assert!(reply.chars().all(|c| c == 'y'));
}

/// A server that never ends an event — one endless `data:` line, or data lines without
/// the blank line that ends an event — cannot make the runner buffer without bound: the
/// turn fails (not retried) once one event passes its bound, and the reply is dropped.
#[tokio::test]
async fn openai_an_event_that_never_ends_fails_the_turn_at_its_bound() {
    let piece = "x".repeat(64 * 1024);
    // 12.8 MiB in all: far past the bound.
    let mut endless_line = vec![sse_head(), Step::Chunk(format!("data: {piece}"))];
    endless_line.extend((0..200).map(|_| Step::Chunk(piece.clone())));
    endless_line.push(Step::End);
    let mut endless_event = vec![sse_head()];
    endless_event.extend((0..200).map(|_| Step::Chunk(format!("data: {piece}\n"))));
    endless_event.push(Step::End);
    for steps in [endless_line, endless_event] {
        let server = serve(vec![steps]).await;
        let (outcome, events) = start(openai(&server.base_url), request("openai", "hi"))
            .finish()
            .await;
        let error = failed(outcome);
        assert_eq!(error.kind, "bad_output", "{error:?}");
        assert!(!error.retryable, "{error:?}");
        assert!(
            error.message.contains("an event of over 1 MiB"),
            "{}",
            error.message
        );
        assert_error_reported(&events, &error);
    }
}

#[tokio::test]
async fn openai_http_errors_are_classified() {
    let unauthorized = error_response(
        401,
        r#"{"error": {"message": "Incorrect API key provided: sk-test", "type": "invalid_request_error", "code": "invalid_api_key"}}"#,
    );
    let server = serve(vec![unauthorized]).await;
    let (outcome, events) = start(openai(&server.base_url), request("openai", "hi"))
        .finish()
        .await;
    let error = failed(outcome);
    assert_eq!(error.kind, "http_status");
    assert!(!error.retryable);
    assert!(error.message.contains("401"), "{}", error.message);
    assert!(
        error.message.contains("Incorrect API key"),
        "{}",
        error.message
    );
    assert_error_reported(&events, &error);

    let server = serve(vec![error_response(503, "upstream overloaded")]).await;
    let (outcome, _) = start(openai(&server.base_url), request("openai", "hi"))
        .finish()
        .await;
    let error = failed(outcome);
    assert!(error.retryable, "{error:?}");
    assert!(error.message.contains("503"), "{}", error.message);

    let server = serve(vec![error_response(
        429,
        r#"{"error": {"message": "slow down"}}"#,
    )])
    .await;
    let (outcome, _) = start(openai(&server.base_url), request("openai", "hi"))
        .finish()
        .await;
    assert!(failed(outcome).retryable);
}

fn ok_reply(text: &str) -> Vec<Step> {
    let mut steps = vec![sse_head()];
    steps.extend(data(&delta_chunk(text)));
    steps.extend(data(&finish_chunk("stop")));
    steps.extend(data("[DONE]"));
    steps.push(Step::End);
    steps
}

fn status_with_retry_after(status: u16, retry_after: &'static str) -> Vec<Step> {
    vec![
        Step::Head {
            status,
            content_type: "application/json",
        },
        Step::Header(retry_after),
        Step::Body(r#"{"error": {"message": "slow down"}}"#.into()),
    ]
}

fn retry_warnings(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.event_type == "runtime.warning" && e.payload["retry"] == true)
        .collect()
}

#[tokio::test]
async fn openai_retries_rate_limits_and_server_errors_then_completes() {
    let mut server = serve(vec![
        status_with_retry_after(429, "retry-after: 0"),
        error_response(500, "boom"),
        ok_reply("at last"),
    ])
    .await;
    let (outcome, events) = start(
        openai_retrying(&server.base_url, 3),
        request("openai", "hi"),
    )
    .finish()
    .await;
    assert_eq!(completed(outcome).0, "at last");
    let warnings = retry_warnings(&events);
    assert_eq!(warnings.len(), 2, "{events:#?}");
    assert_eq!(warnings[0].payload["attempt"], 1);
    assert_eq!(warnings[0].payload["status"], 429);
    assert_eq!(warnings[0].payload["wait_ms"], 0, "Retry-After is honoured");
    assert_eq!(warnings[1].payload["attempt"], 2);
    assert_eq!(warnings[1].payload["status"], 500);
    assert_eq!(
        warnings[1].payload["wait_ms"], 20,
        "back-off doubles per attempt"
    );
    assert!(events.iter().all(|e| e.event_type != "runtime.error"));
    for _ in 0..3 {
        let seen = tokio::time::timeout(DEADLINE, server.requests.recv())
            .await
            .expect("a request")
            .expect("a request");
        assert_eq!(seen.body["messages"][0]["content"], "hi");
    }
}

#[tokio::test]
async fn openai_fails_with_the_last_error_once_the_budget_is_spent() {
    let mut server = serve(vec![
        status_with_retry_after(429, "retry-after: 0"),
        error_response(503, "still down"),
        ok_reply("never sent"),
    ])
    .await;
    let (outcome, events) = start(
        openai_retrying(&server.base_url, 1),
        request("openai", "hi"),
    )
    .finish()
    .await;
    let error = failed(outcome);
    assert!(error.message.contains("503"), "{error:?}");
    assert!(error.message.contains("still down"), "{error:?}");
    assert_error_reported(&events, &error);
    assert_eq!(retry_warnings(&events).len(), 1, "{events:#?}");
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, server.requests.recv())
            .await
            .expect("a request")
            .expect("a request");
    }
    assert!(
        server.requests.try_recv().is_err(),
        "no request after the budget"
    );
}

#[tokio::test]
async fn openai_does_not_retry_a_reply_that_streamed_content_or_a_bad_request() {
    let mut broken = vec![sse_head()];
    broken.extend(data(&delta_chunk("Hel")));
    broken.push(Step::Pause(Duration::from_millis(20)));
    broken.push(Step::Abort);
    let server = serve(vec![broken, ok_reply("again")]).await;
    let (outcome, events) = start(
        openai_retrying(&server.base_url, 3),
        request("openai", "hi"),
    )
    .finish()
    .await;
    assert_eq!(failed(outcome).kind, "stream");
    assert!(retry_warnings(&events).is_empty());

    // A stream dropped before any content is retried.
    let mut empty = vec![sse_head()];
    empty.push(Step::Pause(Duration::from_millis(20)));
    empty.push(Step::Abort);
    let server = serve(vec![empty, ok_reply("again")]).await;
    let (outcome, events) = start(
        openai_retrying(&server.base_url, 3),
        request("openai", "hi"),
    )
    .finish()
    .await;
    assert_eq!(completed(outcome).0, "again");
    assert_eq!(retry_warnings(&events).len(), 1);

    let server = serve(vec![error_response(400, "bad"), ok_reply("never")]).await;
    let (outcome, events) = start(
        openai_retrying(&server.base_url, 3),
        request("openai", "hi"),
    )
    .finish()
    .await;
    assert!(!failed(outcome).retryable);
    assert!(retry_warnings(&events).is_empty());
}

#[tokio::test]
async fn openai_stop_during_a_back_off_ends_the_turn_at_once() {
    let server = serve(vec![
        status_with_retry_after(429, "retry-after: 30"),
        ok_reply("too late"),
    ])
    .await;
    let mut turn = start(
        openai_retrying(&server.base_url, 3),
        request("openai", "hi"),
    );
    let warning = turn
        .wait_for(|e| e.event_type == "runtime.warning" && e.payload["retry"] == true)
        .await;
    assert_eq!(warning.payload["wait_ms"], 30_000);
    let (outcome, took, _) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(took < STOP_WITHIN, "stop took {took:?}");
}

#[tokio::test]
async fn openai_error_inside_the_stream_is_not_retryable() {
    let mut steps = vec![sse_head()];
    steps.extend(data(&delta_chunk("Hi")));
    steps.extend(data(
        &json!({"error": {"message": "the model crashed on this input", "type": "invalid_request_error"}}).to_string(),
    ));
    steps.push(Step::End);
    let server = serve(vec![steps]).await;
    let (outcome, events) = start(openai(&server.base_url), request("openai", "hi"))
        .finish()
        .await;
    let error = failed(outcome);
    assert_eq!(error.kind, "api_error");
    assert!(!error.retryable);
    assert!(
        error.message.contains("the model crashed"),
        "{}",
        error.message
    );
    assert_error_reported(&events, &error);
}

#[tokio::test]
async fn openai_reply_cut_by_length_warns_and_completes_without_done() {
    // Some servers close after the finish reason without `[DONE]`: the reply is whole.
    let mut steps = vec![sse_head()];
    steps.extend(data(&delta_chunk("abc")));
    steps.extend(data(&finish_chunk("length")));
    steps.push(Step::End);
    let server = serve(vec![steps]).await;
    let (outcome, events) = start(openai(&server.base_url), request("openai", "hi"))
        .finish()
        .await;
    assert_eq!(completed(outcome).0, "abc");
    assert_eq!(
        types(&events),
        [
            "item.started",
            "content.delta",
            "item.completed",
            "runtime.warning"
        ]
    );
    assert_eq!(events[3].payload["finish_reason"], "length");
}

#[tokio::test]
async fn openai_unreachable_server_is_retryable() {
    // A port that was just free: nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    let provider = openai(&format!("http://{addr}/v1"));
    let (outcome, events) = start(provider, request("openai", "hi")).finish().await;
    let error = failed(outcome);
    assert_eq!(error.kind, "connect", "{error:?}");
    assert!(error.retryable);
    assert_error_reported(&events, &error);
}

#[tokio::test]
async fn openai_stop_closes_the_connection() {
    let mut steps = vec![sse_head()];
    steps.extend(data(&delta_chunk("Hel")));
    steps.push(Step::AwaitClientClose);
    let mut server = serve(vec![steps]).await;
    let mut turn = start(openai(&server.base_url), request("openai", "hi"));
    turn.wait_for(|e| is_delta(e, "assistant_text")).await;
    let (outcome, took, _) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(took < STOP_WITHIN, "stop took {took:?}");
    tokio::time::timeout(DEADLINE, server.client_closed.recv())
        .await
        .expect("the client closed the connection")
        .expect("the server reported it");
}

#[tokio::test]
async fn openai_steer_sends_a_follow_up_request() {
    let gate = Arc::new(Notify::new());
    let mut first = vec![sse_head()];
    first.extend(data(&delta_chunk("Hello")));
    first.push(Step::Gate(gate.clone()));
    first.extend(data(&delta_chunk(" there")));
    first.extend(data(&finish_chunk("stop")));
    first.extend(data(&usage_chunk(5, 2)));
    first.extend(data("[DONE]"));
    first.push(Step::End);
    let mut second = vec![sse_head()];
    second.extend(data(&delta_chunk("Going left.")));
    second.extend(data(&finish_chunk("stop")));
    second.extend(data(&usage_chunk(9, 3)));
    second.extend(data("[DONE]"));
    second.push(Step::End);
    let mut server = serve(vec![first, second]).await;

    let mut turn = start(openai(&server.base_url), request("openai", "say hello"));
    turn.wait_for(|e| is_delta(e, "assistant_text")).await;
    turn.steer
        .send("go left".into())
        .await
        .expect("the turn takes steers");
    gate.notify_one();
    let (outcome, events) = turn.finish().await;
    let (reply, usage) = completed(outcome);
    assert_eq!(reply, "Hello there\n\nGoing left.");
    assert_eq!(
        usage,
        Some(Usage {
            input_tokens: 14,
            output_tokens: 5
        })
    );
    let messages: Vec<&Event> = events
        .iter()
        .filter(|e| e.event_type == "item.completed")
        .collect();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].payload["text"], "Hello there");
    assert_eq!(messages[1].payload["text"], "Going left.");
    assert_ne!(
        messages[0].payload["item_id"],
        messages[1].payload["item_id"]
    );

    let first_seen = server.requests.recv().await.expect("the first request");
    assert_eq!(
        first_seen.body["messages"].as_array().map(Vec::len),
        Some(1)
    );
    let second_seen = tokio::time::timeout(DEADLINE, server.requests.recv())
        .await
        .expect("a follow-up request")
        .expect("the follow-up request");
    assert_eq!(
        second_seen.body["messages"],
        json!([
            {"role": "user", "content": "say hello"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "go left"},
        ])
    );
}

// ---------------------------------------------------------------------------------------
// command
// ---------------------------------------------------------------------------------------

fn shell(script: &str, grace: Duration) -> CommandProvider {
    CommandProvider::new(CommandConfig {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        grace,
    })
}

/// True once no process `pid` exists, not even as a zombie.
fn gone(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    let esrch = rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    esrch && !std::path::Path::new(&format!("/proc/{pid}/status")).exists()
}

/// Waits for the script's first output line, its pid (`echo $$`).
async fn child_pid(turn: &mut Running) -> i32 {
    let line = turn.wait_for(|e| is_delta(e, "command_output")).await;
    line.payload["delta"]
        .as_str()
        .and_then(|d| d.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected a pid, got {line:?}"))
}

#[tokio::test]
async fn command_maps_json_lines_output_and_result() {
    let script = r#"
read -r line
echo "prompt-line: $line"
echo '{"type":"item.started","item_id":"m1","kind":"assistant_message"}'
echo '{"type":"content.delta","item_id":"m1","kind":"assistant_text","delta":"Hi "}'
echo '{"type":"content.delta","item_id":"m1","kind":"assistant_text","delta":"there"}'
echo '{"type":"content.delta","item_id":"m1","kind":"assistant_text"}'
echo '{"type":"turn.completed","state":"completed"}'
echo '{"type":"run.terminal"}'
echo '{"type":"bogus.event"}'
echo 'plain output'
echo '{"type":"item.completed","item_id":"m1","kind":"assistant_message","text":"Hi there"}'
echo '{"type":"result","text":"final answer","usage":{"input_tokens":7,"output_tokens":2}}'
"#;
    let mut turn = request("command", "what now?");
    turn.history = vec![Exchange {
        prompt: "before".into(),
        reply: "earlier".into(),
    }];
    let (outcome, events) = start(shell(script, Duration::from_secs(1)), turn)
        .finish()
        .await;
    let (reply, usage) = completed(outcome);
    assert_eq!(reply, "final answer");
    assert_eq!(
        usage,
        Some(Usage {
            input_tokens: 7,
            output_tokens: 2
        })
    );
    assert_eq!(
        types(&events),
        [
            "item.started",
            "content.delta",
            "item.started",
            "content.delta",
            "content.delta",
            "runtime.warning",
            "runtime.warning",
            "runtime.warning",
            "runtime.warning",
            "content.delta",
            "item.completed",
            "usage.updated",
            "item.completed",
        ]
    );
    let output = deltas(&events, "command_output");
    assert_eq!(output.len(), 2);
    let prompt_line = output[0]
        .strip_prefix("prompt-line: ")
        .expect("the prompt line");
    let prompt: Value = serde_json::from_str(prompt_line.trim_end()).expect("the prompt is JSON");
    assert_eq!(prompt["type"], "prompt");
    assert_eq!(prompt["text"], "what now?");
    assert_eq!(
        prompt["history"],
        json!([{"prompt": "before", "reply": "earlier"}])
    );
    assert_eq!(output[1], "plain output\n");
    assert_eq!(deltas(&events, "assistant_text"), ["Hi ", "there"]);
    let warnings: Vec<&str> = events
        .iter()
        .filter(|e| e.event_type == "runtime.warning")
        .map(|e| e.payload["message"].as_str().unwrap_or_default())
        .collect();
    assert!(warnings[0].contains("delta"), "{warnings:?}");
    assert!(warnings[1].contains("turn.completed"), "{warnings:?}");
    assert!(warnings[2].contains("run.terminal"), "{warnings:?}");
    assert!(warnings[3].contains("bogus.event"), "{warnings:?}");
    assert_eq!(events[0].payload["kind"], "command_output");
    assert_eq!(events[12].payload["item_id"], events[0].payload["item_id"]);
}

#[tokio::test]
async fn command_without_result_replies_with_its_assistant_text() {
    let script = r#"
echo '{"type":"content.delta","item_id":"m1","kind":"assistant_text","delta":"Hi "}'
printf '{"type":"content.delta","item_id":"m1","kind":"assistant_text","delta":"there"}'
"#;
    let (outcome, _) = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    )
    .finish()
    .await;
    let (reply, usage) = completed(outcome);
    // The last line has no newline and still counts.
    assert_eq!(reply, "Hi there");
    assert_eq!(usage, None);
}

#[tokio::test]
async fn command_failure_reports_exit_status_and_stderr_tail() {
    let script = r#"
echo working
head -c 5000 /dev/zero | tr '\0' x >&2
echo >&2
echo "fatal: the model exploded" >&2
exit 3
"#;
    let (outcome, events) = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    )
    .finish()
    .await;
    let error = failed(outcome);
    assert_eq!(error.kind, "process_exit");
    assert!(!error.retryable);
    assert!(
        error.message.contains("exit status: 3"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("fatal: the model exploded"),
        "{}",
        error.message
    );
    assert!(error.message.len() < 2300, "{} bytes", error.message.len());
    assert_eq!(deltas(&events, "command_output"), ["working\n"]);
    assert_error_reported(&events, &error);
}

#[tokio::test]
async fn command_that_cannot_start_fails() {
    let provider = CommandProvider::new(CommandConfig {
        program: "/nonexistent/agent-cli".into(),
        args: Vec::new(),
        grace: Duration::from_secs(1),
    });
    let (outcome, events) = start(provider, request("command", "hi")).finish().await;
    let error = failed(outcome);
    assert_eq!(error.kind, "spawn");
    assert!(!error.retryable);
    assert_error_reported(&events, &error);
}

#[tokio::test]
async fn command_stop_kills_a_child_that_ignores_sigterm() {
    let grace = Duration::from_millis(300);
    let mut turn = start(
        shell("trap '' TERM; echo $$; sleep 1000", grace),
        request("command", "hi"),
    );
    let pid = child_pid(&mut turn).await;
    let (outcome, took, _) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(
        took >= grace,
        "SIGKILL came before the grace period ended ({took:?})"
    );
    assert!(took < Duration::from_millis(1500), "stop took {took:?}");
    assert!(gone(pid), "process {pid} still exists");
}

#[tokio::test]
async fn command_stop_is_quick_when_the_child_exits_on_sigterm() {
    let grace = Duration::from_secs(10);
    let mut turn = start(
        shell("echo $$; sleep 1000", grace),
        request("command", "hi"),
    );
    let pid = child_pid(&mut turn).await;
    let (outcome, took, _) = turn.stop().await;
    assert_eq!(outcome, TurnOutcome::Stopped);
    assert!(took < STOP_WITHIN, "stop took {took:?}");
    assert!(gone(pid), "process {pid} still exists");
}

/// True once `pid` has exited: gone, or a zombie its new parent has yet to reap.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn command_leftover_processes_end_with_the_turn() {
    // The background sleep keeps the child's stdout open after the child exits.
    let script = r#"sleep 1000 & echo $!; echo '{"type":"result","text":"ok"}'"#;
    let mut turn = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    );
    let leftover = child_pid(&mut turn).await;
    let (outcome, _) = turn.finish().await;
    assert_eq!(completed(outcome).0, "ok");
    let deadline = Instant::now() + DEADLINE;
    while !exited(leftover) {
        assert!(
            Instant::now() < deadline,
            "process {leftover} outlived the turn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn command_receives_steers_on_stdin() {
    let script = r#"
read -r prompt
echo ready
read -r steer
text=$(printf '%s' "$steer" | sed 's/.*"text":"\([^"]*\)".*/\1/')
printf '{"type":"content.delta","item_id":"s","kind":"assistant_text","delta":"steered: %s"}\n' "$text"
echo '{"type":"result","text":"done"}'
"#;
    let mut turn = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    );
    turn.wait_for(|e| is_delta(e, "command_output") && e.payload["delta"] == "ready\n")
        .await;
    turn.steer
        .send("go left".into())
        .await
        .expect("the turn takes steers");
    let (outcome, events) = turn.finish().await;
    assert_eq!(completed(outcome).0, "done");
    assert_eq!(deltas(&events, "assistant_text"), ["steered: go left"]);
}

#[tokio::test]
async fn command_receives_resolutions_on_stdin() {
    let script = r#"
read -r prompt
echo '{"type":"request.opened","request_id":"7b0e4a8e-8a4f-4e0b-9a53-0d7f6f0e1a2b","kind":"command"}'
while read -r line; do
  case "$line" in
    *'"type":"resolution"'*)
      decision=$(printf '%s' "$line" | sed 's/.*"decision":"\([^"]*\)".*/\1/')
      id=$(printf '%s' "$line" | sed 's/.*"request_id":"\([^"]*\)".*/\1/')
      printf '{"type":"result","text":"%s %s"}\n' "$decision" "$id"
      exit 0 ;;
    *'"type":"steer"'*)
      echo '{"type":"content.delta","item_id":"s","kind":"assistant_text","delta":"steer seen"}' ;;
  esac
done
"#;
    let mut turn = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    );
    turn.wait_for(|e| e.event_type == "request.opened").await;
    turn.steer.send("not an answer".into()).await.unwrap();
    turn.wait_for(|e| is_delta(e, "assistant_text")).await;
    turn.resolutions
        .send(Resolution {
            request_id: "7b0e4a8e-8a4f-4e0b-9a53-0d7f6f0e1a2b".into(),
            decision: "accept".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (outcome, _) = turn.finish().await;
    assert_eq!(
        completed(outcome).0,
        "accept 7b0e4a8e-8a4f-4e0b-9a53-0d7f6f0e1a2b"
    );
}

// ---------------------------------------------------------------------------------------
// conversation context: history and provider thread ids
// ---------------------------------------------------------------------------------------

fn thread_of(outcome: TurnOutcome) -> Option<String> {
    match outcome {
        TurnOutcome::Completed {
            provider_thread_id, ..
        } => provider_thread_id,
        other => panic!("expected Completed, got {other:?}"),
    }
}

#[tokio::test]
async fn scripted_recall_shows_the_history_and_thread_it_was_given() {
    let mut turn = request("scripted", "[recall] [thread:thr-9] and now?");
    turn.history = vec![
        Exchange {
            prompt: "first".into(),
            reply: "one".into(),
        },
        Exchange {
            prompt: "second".into(),
            reply: "two".into(),
        },
    ];
    turn.provider_thread_id = Some("thr-8".into());
    let (outcome, events) = start(scripted(0), turn).finish().await;
    assert_eq!(
        deltas(&events, "assistant_text")[0],
        "[recall: 2 turns; last prompt: second; last reply: two; thread: thr-8]"
    );
    assert_eq!(thread_of(outcome), Some("thr-9".into()));

    let (outcome, events) = start(scripted(0), request("scripted", "[recall]"))
        .finish()
        .await;
    assert_eq!(
        deltas(&events, "assistant_text")[0],
        "[recall: 0 turns; last prompt: -; last reply: -; thread: -]"
    );
    assert_eq!(thread_of(outcome), None, "no [thread:X] cue, no thread");
}

#[tokio::test]
async fn command_gets_the_thread_id_and_reports_a_new_one() {
    let script = r#"
read -r line
echo "prompt-line: $line"
echo '{"type":"result","text":"ok","thread_id":"thr-2"}'
"#;
    let mut turn = request("command", "continue");
    turn.provider_thread_id = Some("thr-1".into());
    let (outcome, events) = start(shell(script, Duration::from_secs(1)), turn)
        .finish()
        .await;
    let output = deltas(&events, "command_output");
    let prompt: Value = serde_json::from_str(
        output[0]
            .strip_prefix("prompt-line: ")
            .expect("the prompt line")
            .trim_end(),
    )
    .expect("the prompt is JSON");
    assert_eq!(prompt["provider_thread_id"], "thr-1");
    assert_eq!(thread_of(outcome), Some("thr-2".into()));

    // Without a thread the prompt says null; a thread id that is not a string is
    // ignored with a warning.
    let script = r#"
read -r line
echo "prompt-line: $line"
echo '{"type":"result","text":"ok","thread_id":7}'
"#;
    let (outcome, events) = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    )
    .finish()
    .await;
    let output = deltas(&events, "command_output");
    assert!(
        output[0].contains(r#""provider_thread_id":null"#),
        "{output:?}"
    );
    assert_eq!(thread_of(outcome), None);
    assert!(
        events.iter().any(|e| e.event_type == "runtime.warning"
            && e.payload["message"]
                .as_str()
                .unwrap_or_default()
                .contains("thread_id")),
        "{events:#?}"
    );
}

#[tokio::test]
async fn command_result_alone_is_recorded_as_the_assistant_message() {
    let script = r#"
read -r line
echo '{"type":"result","text":"forty-two"}'
"#;
    let (outcome, events) = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    )
    .finish()
    .await;
    assert_eq!(completed(outcome).0, "forty-two");
    assert_eq!(types(&events), ["item.started", "item.completed"]);
    assert_eq!(events[1].payload["kind"], "assistant_message");
    assert_eq!(events[1].payload["text"], "forty-two");
    assert_eq!(events[0].payload["item_id"], events[1].payload["item_id"]);

    // With assistant text streamed, the result is not recorded a second time.
    let script = r#"
read -r line
echo '{"type":"content.delta","item_id":"m","kind":"assistant_text","delta":"forty"}'
echo '{"type":"result","text":"forty-two"}'
"#;
    let (outcome, events) = start(
        shell(script, Duration::from_secs(1)),
        request("command", "hi"),
    )
    .finish()
    .await;
    assert_eq!(completed(outcome).0, "forty-two");
    assert_eq!(types(&events), ["content.delta"]);
}
