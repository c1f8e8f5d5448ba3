//! Webhooks against a real manager: deliveries made from the log, signed, retried with
//! back-off until the receiver takes them, deduplicable by their stable id; a slow
//! receiver never delays appends; filters by event type and project; deletion; tenant
//! isolation; bad input; two replicas delivering each event once.
//!
//! The receiver is a small HTTP server in the test that answers each request as its
//! script says (a status, a dropped connection, or no answer at all), records what it
//! got, and "processes" each delivery id once, as a real receiver deduplicating by id
//! would.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentrun_manager::config::AuthMode;
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto::webhook_service_client::WebhookServiceClient;
use agentrun_shared::proto::{self, DeliveryStatus, RunStatus};
use agentrun_tests::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::operability::{sample, scrape};

const LONG: Duration = Duration::from_secs(30);
const SECRET: &str = "a-test-secret-of-enough-bytes";
/// The body of a [`Answer::Huge`] answer.
const HUGE_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Reads the request, then closes the connection without a word.
    Drop,
    /// Reads the request and never answers.
    Hang,
    /// Answers with this status and a body of many megabytes.
    Huge(u16),
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    delivery_id: String,
    event_type: String,
    signature: String,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a delivery body is JSON")
    }
}

#[derive(Default)]
struct Seen {
    requests: Vec<Received>,
    /// Delivery ids processed (answered 2xx), each once: a receiver's dedup.
    processed: Vec<String>,
    /// Successful requests whose id was already processed.
    duplicates: usize,
}

struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    /// Answers the first requests as `script` says, every later one with `then`.
    async fn start(script: Vec<Answer>, then: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let state = state.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let Some(received) = read_request(&mut socket).await else {
                        return;
                    };
                    let answer = {
                        let mut seen = state.lock().unwrap();
                        seen.requests.push(received.clone());
                        let answer = script.get(seen.requests.len() - 1).copied().unwrap_or(then);
                        if let Answer::Status(code) = answer
                            && (200..300).contains(&code)
                        {
                            if seen.processed.contains(&received.delivery_id) {
                                seen.duplicates += 1;
                            } else {
                                seen.processed.push(received.delivery_id.clone());
                            }
                        }
                        answer
                    };
                    match answer {
                        Answer::Status(code) => {
                            let response = format!(
                                "HTTP/1.1 {code} Whatever\r\ncontent-length: 2\r\n\
                                 connection: close\r\n\r\nok"
                            );
                            let _ = socket.write_all(response.as_bytes()).await;
                            let _ = socket.shutdown().await;
                        }
                        Answer::Drop => drop(socket),
                        Answer::Huge(code) => {
                            let head = format!(
                                "HTTP/1.1 {code} Whatever\r\ncontent-length: {}\r\n\
                                 connection: close\r\n\r\n",
                                HUGE_BODY_BYTES
                            );
                            if socket.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            let chunk = vec![b'x'; 64 * 1024];
                            for _ in 0..HUGE_BODY_BYTES / chunk.len() {
                                if socket.write_all(&chunk).await.is_err() {
                                    // The manager stopped reading: as it should.
                                    return;
                                }
                            }
                            let _ = socket.shutdown().await;
                        }
                        Answer::Hang => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            drop(socket);
                        }
                    }
                });
            }
        });
        Self { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Received> {
        self.seen.lock().unwrap().requests.clone()
    }

    fn processed(&self) -> Vec<String> {
        self.seen.lock().unwrap().processed.clone()
    }

    fn duplicates(&self) -> usize {
        self.seen.lock().unwrap().duplicates
    }
}

/// One HTTP/1.1 request: its head and a body of `content-length` bytes.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..at]).into_owned();
            let length = header(&head, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            break (at + 4, length);
        }
    };
    while buf.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    Some(Received {
        path,
        delivery_id: header(&head, "agentrun-delivery-id").unwrap_or_default(),
        event_type: header(&head, "agentrun-event-type").unwrap_or_default(),
        signature: header(&head, "agentrun-signature").unwrap_or_default(),
        body: buf[head_end..head_end + length].to_vec(),
    })
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// Whether `signature` (`t=<unix>,v1=<hex>`) is HMAC-SHA256(secret, "<t>.<body>"),
/// checked as a receiver would, with an independent implementation.
fn signature_valid(secret: &str, signature: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in signature.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(unix) = t.parse::<u64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(unix) > 300 {
        return false;
    }
    let mut mac = Hmac::<hmac_sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == v1
}

async fn webhooks_client(addr: SocketAddr) -> WebhookServiceClient<Channel> {
    WebhookServiceClient::new(connect(addr).await)
}

fn webhook_request(url: String, types: &[&str]) -> proto::CreateWebhookRequest {
    proto::CreateWebhookRequest {
        url,
        event_types: types.iter().map(|t| t.to_string()).collect(),
        secret: SECRET.into(),
        project_id: String::new(),
    }
}

async fn create_webhook(
    client: &mut WebhookServiceClient<Channel>,
    request: proto::CreateWebhookRequest,
) -> proto::Webhook {
    client
        .create_webhook(request)
        .await
        .expect("create webhook")
        .into_inner()
        .webhook
        .expect("a webhook")
}

async fn deliveries(
    client: &mut WebhookServiceClient<Channel>,
    webhook_id: &str,
) -> Vec<proto::Delivery> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_deliveries(proto::ListDeliveriesRequest {
                webhook_id: webhook_id.into(),
                page_size: 500,
                page_token,
            })
            .await
            .expect("list deliveries")
            .into_inner();
        all.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

fn status(d: &proto::Delivery) -> DeliveryStatus {
    DeliveryStatus::try_from(d.status).expect("a known delivery status")
}

/// Creates a run, claims it with a unary runner and finishes it `completed`: the log
/// gets run.created, run.claimed and run.terminal (and what finishing adds).
async fn run_to_completion(app: &mut TestApp, request: proto::CreateRunRequest) -> String {
    let run_id = app
        .runs
        .create_run(request)
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id;
    let runner = runner("webhook-test-runner");
    let held = claim(app, &runner, 1).await;
    app.runners
        .finish_run(finish(&runner, &held[0], RunStatus::Completed))
        .await
        .expect("finish run");
    wait_for_run(app, &run_id, RunStatus::Completed, LONG).await;
    run_id
}

/// The done-when test: a receiver that fails twice (a 500, then a dropped connection),
/// then succeeds, gets the delivery exactly once by its id, each attempt validly signed;
/// the delivery shows delivered after 3 attempts.
#[tokio::test]
async fn a_receiver_failing_twice_gets_the_delivery_once_by_id_with_a_valid_signature() {
    let receiver =
        Receiver::start(vec![Answer::Status(500), Answer::Drop], Answer::Status(200)).await;
    let mut app = TestApp::spawn_with(|s| s.metrics_listen = "127.0.0.1:0".into()).await;
    let mut hooks = webhooks_client(app.addr).await;
    let hook = create_webhook(
        &mut hooks,
        webhook_request(receiver.url("/hook"), &["run.created"]),
    )
    .await;
    let run_id = create(&mut app, "hello").await;

    let delivered = wait_for("the delivery to be delivered", LONG, || {
        let mut hooks = hooks.clone();
        let id = hook.webhook_id.clone();
        async move {
            let all = deliveries(&mut hooks, &id).await;
            (all.len() == 1 && status(&all[0]) == DeliveryStatus::Delivered).then(|| all[0].clone())
        }
    })
    .await;
    assert_eq!(delivered.attempts, 3, "{delivered:?}");
    assert_eq!(delivered.last_status_code, 200);
    assert!(delivered.last_error.is_empty(), "{delivered:?}");
    assert!(delivered.delivered_at.is_some());
    assert_eq!(delivered.run_id, run_id);
    assert_eq!(delivered.seq, 1);
    assert_eq!(delivered.event_type, "run.created");

    let requests = receiver.requests();
    assert_eq!(requests.len(), 3, "three attempts reached the receiver");
    for request in &requests {
        assert_eq!(request.path, "/hook");
        assert_eq!(request.delivery_id, delivered.delivery_id, "a stable id");
        assert_eq!(request.event_type, "run.created");
        assert!(
            signature_valid(SECRET, &request.signature, &request.body),
            "a valid signature: {:?}",
            request.signature
        );
        assert!(
            !signature_valid(
                "another-secret-of-enough-bytes",
                &request.signature,
                &request.body
            ),
            "the signature depends on the secret"
        );
        assert_eq!(
            request.body, requests[0].body,
            "the same body every attempt"
        );
    }
    assert_eq!(receiver.processed(), vec![delivered.delivery_id.clone()]);
    assert_eq!(receiver.duplicates(), 0);

    let body = requests[0].json();
    assert_eq!(body["delivery_id"], delivered.delivery_id);
    assert_eq!(body["webhook_id"], hook.webhook_id);
    assert_eq!(body["type"], "run.created");
    assert_eq!(body["run_id"], run_id);
    assert_eq!(body["seq"], 1);
    assert!(body["created_at"].is_string());
    let event = &body["event"];
    assert_eq!(event["run_id"], run_id);
    assert_eq!(event["seq"], 1);
    assert_eq!(event["type"], "run.created");
    assert!(
        event["payload"].is_object(),
        "payload as an object: {event}"
    );
    assert_eq!(event["producer"], "manager");
    // The event is the one in the log.
    let logged = events_of(&mut app, &run_id).await;
    assert_eq!(payload(&logged[0]), event["payload"]);

    // Counted: one delivered, two failed attempts, none given up.
    let metrics = scrape(app.metrics_addr.expect("metrics served")).await;
    let count = |name: &str| sample(&metrics, name, &[]);
    assert_eq!(count("agentrun_webhook_deliveries_delivered_total"), 1.0);
    assert_eq!(count("agentrun_webhook_attempts_failed_total"), 2.0);
    assert_eq!(count("agentrun_webhook_deliveries_failed_total"), 0.0);
}

/// A receiver that never answers holds its deliveries in flight, and meanwhile a run is
/// created, claimed, streams and finishes as fast as ever, every event stored.
#[tokio::test]
async fn a_slow_receiver_never_delays_appends() {
    let receiver = Receiver::start(vec![], Answer::Hang).await;
    let mut app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let all_types = [
        "run.created",
        "run.claimed",
        "run.started",
        "run.requeued",
        "run.terminal",
        "turn.started",
        "turn.completed",
        "request.opened",
        "request.resolved",
        "runtime.error",
    ];
    let hook = create_webhook(
        &mut hooks,
        webhook_request(receiver.url("/slow"), &all_types),
    )
    .await;
    // A first run whose deliveries hang at the receiver.
    create(&mut app, "first").await;
    wait_for("a delivery to hang at the receiver", LONG, || async {
        (!receiver.requests().is_empty()).then_some(())
    })
    .await;

    let started = Instant::now();
    let run_id = app
        .runs
        .create_run(run_request("second"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let runner = runner("fast-runner");
    let held = loop {
        let held = claim(&mut app, &runner, 1).await;
        if held[0].run.as_ref().unwrap().run_id == run_id {
            break held;
        }
        // The first run: finish it too.
        app.runners
            .finish_run(finish(&runner, &held[0], RunStatus::Completed))
            .await
            .unwrap();
    };
    let mut events = vec![proto::RunnerEvent {
        runner_seq: 1,
        r#type: "turn.started".into(),
        payload_json: r#"{"turn_id":"t1"}"#.into(),
    }];
    events.extend(deltas(2, 50));
    events.push(proto::RunnerEvent {
        runner_seq: 51,
        r#type: "turn.completed".into(),
        payload_json: r#"{"turn_id":"t1","state":"completed"}"#.into(),
    });
    app.runners
        .append_events(append(&runner, &held[0], events))
        .await
        .expect("append while deliveries hang");
    app.runners
        .finish_run(finish(&runner, &held[0], RunStatus::Completed))
        .await
        .expect("finish while deliveries hang");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "the run's writes took {elapsed:?} with a hanging receiver"
    );
    let types = event_types(&mut app, &run_id).await;
    assert_eq!(types.first().map(String::as_str), Some("run.created"));
    assert_eq!(types.last().map(String::as_str), Some("run.terminal"));
    assert!(types.iter().filter(|t| *t == "content.delta").count() == 49);

    // The deliveries are there, pending, none delivered; stream content is not among them.
    let listed = deliveries(&mut hooks, &hook.webhook_id).await;
    assert!(
        listed
            .iter()
            .any(|d| d.run_id == run_id && d.event_type == "run.terminal")
    );
    assert!(listed.iter().all(|d| status(d) == DeliveryStatus::Pending));
    assert!(listed.iter().all(|d| d.event_type != "content.delta"));
    assert!(receiver.processed().is_empty());
}

/// A webhook gets only the types it asked for, and only its project's runs when it
/// names one.
#[tokio::test]
async fn deliveries_follow_event_types_and_project() {
    let receiver = Receiver::start(vec![], Answer::Status(204)).await;
    let mut app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let terminal = create_webhook(
        &mut hooks,
        webhook_request(receiver.url("/terminal"), &["run.terminal"]),
    )
    .await;
    let mut scoped = webhook_request(receiver.url("/alpha"), &["run.created", "run.claimed"]);
    scoped.project_id = "alpha".into();
    let alpha = create_webhook(&mut hooks, scoped).await;
    assert_eq!(alpha.project_id, "alpha");

    let mut in_alpha = run_request("alpha run");
    in_alpha.project_id = "alpha".into();
    let alpha_run = run_to_completion(&mut app, in_alpha).await;
    let mut in_beta = run_request("beta run");
    in_beta.project_id = "beta".into();
    let beta_run = run_to_completion(&mut app, in_beta).await;

    // Terminals of both runs; created and claimed of the alpha run only.
    wait_for("four deliveries", LONG, || async {
        (receiver.processed().len() >= 4).then_some(())
    })
    .await;
    let got: HashSet<(String, String, String)> = receiver
        .requests()
        .iter()
        .map(|r| {
            let body = r.json();
            (
                r.path.clone(),
                body["run_id"].as_str().unwrap().to_owned(),
                r.event_type.clone(),
            )
        })
        .collect();
    let want: HashSet<(String, String, String)> = [
        ("/terminal", &alpha_run, "run.terminal"),
        ("/terminal", &beta_run, "run.terminal"),
        ("/alpha", &alpha_run, "run.created"),
        ("/alpha", &alpha_run, "run.claimed"),
    ]
    .into_iter()
    .map(|(p, r, t)| (p.to_owned(), r.clone(), t.to_owned()))
    .collect();
    assert_eq!(got, want);
    let listed = deliveries(&mut hooks, &terminal.webhook_id).await;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|d| d.event_type == "run.terminal"));
    // Newest first.
    assert_eq!(listed[0].run_id, beta_run);
    assert_eq!(deliveries(&mut hooks, &alpha.webhook_id).await.len(), 2);
}

/// Deleting a webhook drops its pending deliveries (no more attempts) and no new ones
/// are made for it; it is gone from the list and its deliveries are NOT_FOUND.
#[tokio::test]
async fn a_deleted_webhook_gets_no_more_deliveries() {
    let failing = Receiver::start(vec![], Answer::Status(503)).await;
    let mut app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let hook = create_webhook(
        &mut hooks,
        webhook_request(failing.url("/gone"), &["run.created"]),
    )
    .await;
    create(&mut app, "one").await;
    let first = wait_for("a failed first attempt recorded", LONG, || {
        let mut hooks = hooks.clone();
        let id = hook.webhook_id.clone();
        async move {
            deliveries(&mut hooks, &id)
                .await
                .into_iter()
                .find(|d| d.attempts == 1 && d.last_status_code == 503)
        }
    })
    .await;
    assert_eq!(status(&first), DeliveryStatus::Pending);
    assert!(first.last_error.contains("503"), "{first:?}");
    assert!(first.next_attempt_at.is_some());

    hooks
        .delete_webhook(proto::DeleteWebhookRequest {
            webhook_id: hook.webhook_id.clone(),
        })
        .await
        .expect("delete");
    let listed = hooks
        .list_webhooks(proto::ListWebhooksRequest {})
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert!(listed.is_empty());
    let gone = hooks
        .list_deliveries(proto::ListDeliveriesRequest {
            webhook_id: hook.webhook_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let again = hooks
        .delete_webhook(proto::DeleteWebhookRequest {
            webhook_id: hook.webhook_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // A later event makes no delivery for it, and the dropped one is never retried: the
    // attempts seen stop at what was in flight when it was deleted.
    create(&mut app, "two").await;
    let db = app.db().await;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1::text::uuid",
            &[&hook.webhook_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the webhook's deliveries were dropped");
    // Its retry was due one second after the first attempt: three seconds on, a live
    // webhook would have had it.
    let seen = failing.requests().len();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(failing.requests().len(), seen, "no attempt after deletion");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen <= 2, "{seen} attempts");
}

/// With authentication, a tenant's webhooks are its own: another tenant cannot list,
/// delete or read them (NOT_FOUND, as for an id that does not exist), and its runs'
/// events never reach them.
#[tokio::test]
async fn webhooks_are_tenant_scoped() {
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let mut app = TestApp::spawn_with(|s| s.auth = AuthMode::Required).await;
    let acme = key(&app, "acme", Role::Client).await;
    let globex = key(&app, "globex", Role::Client).await;
    let globex_runner = key(&app, "globex", Role::Runner).await;
    let mut hooks = webhooks_client(app.addr).await;

    let no_key = hooks
        .list_webhooks(proto::ListWebhooksRequest {})
        .await
        .unwrap_err();
    assert_eq!(no_key.code(), Code::Unauthenticated);
    let runner_key = hooks
        .list_webhooks(with_key(&globex_runner, proto::ListWebhooksRequest {}))
        .await
        .unwrap_err();
    assert_eq!(runner_key.code(), Code::PermissionDenied);

    let created = hooks
        .create_webhook(with_key(
            &acme,
            webhook_request(receiver.url("/acme"), &["run.created"]),
        ))
        .await
        .unwrap()
        .into_inner();
    let hook = created.webhook.unwrap();
    assert_eq!(created.secret, SECRET);

    let theirs = hooks
        .list_webhooks(with_key(&globex, proto::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert!(theirs.is_empty());
    let ours = hooks
        .list_webhooks(with_key(&acme, proto::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(ours.len(), 1);

    let unknown = uuid::Uuid::now_v7().to_string();
    for id in [&hook.webhook_id, &unknown] {
        let listed = hooks
            .list_deliveries(with_key(
                &globex,
                proto::ListDeliveriesRequest {
                    webhook_id: id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(listed.code(), Code::NotFound);
        assert_eq!(listed.message(), "webhook not found");
        let deleted = hooks
            .delete_webhook(with_key(
                &globex,
                proto::DeleteWebhookRequest {
                    webhook_id: id.clone(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(deleted.code(), Code::NotFound);
        assert_eq!(deleted.message(), "webhook not found");
    }

    // globex's run first, then acme's: only acme's reaches acme's webhook.
    let globex_run = app
        .runs
        .create_run(with_key(&globex, run_request("globex")))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let acme_run = app
        .runs
        .create_run(with_key(&acme, run_request("acme")))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for("acme's delivery", LONG, || async {
        (!receiver.processed().is_empty()).then_some(())
    })
    .await;
    let listed = hooks
        .list_deliveries(with_key(
            &acme,
            proto::ListDeliveriesRequest {
                webhook_id: hook.webhook_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    let runs: Vec<&str> = listed.iter().map(|d| d.run_id.as_str()).collect();
    assert_eq!(runs, vec![acme_run.as_str()]);
    assert!(
        receiver
            .requests()
            .iter()
            .all(|r| r.json()["run_id"] != globex_run.as_str())
    );

    // Still acme's after globex's attempts.
    hooks
        .delete_webhook(with_key(
            &acme,
            proto::DeleteWebhookRequest {
                webhook_id: hook.webhook_id.clone(),
            },
        ))
        .await
        .expect("the owner deletes it");
}

async fn key(app: &TestApp, tenant: &str, role: Role) -> String {
    project_key(app, tenant, role, &[]).await
}

async fn project_key(app: &TestApp, tenant: &str, role: Role, projects: &[&str]) -> String {
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    let projects: Vec<String> = projects.iter().map(|p| p.to_string()).collect();
    api_keys::create(&client, tenant, role, &projects, "test", None)
        .await
        .expect("create key")
        .key
}

/// A key limited to a project makes webhooks of that project only, and sees and deletes
/// only those: a webhook of every project, or of another, is NOT_FOUND to it.
#[tokio::test]
async fn a_project_limited_key_sees_only_its_projects_webhooks() {
    let app = TestApp::spawn_with(|s| s.auth = AuthMode::Required).await;
    let whole = key(&app, "acme", Role::Client).await;
    let alpha = project_key(&app, "acme", Role::Client, &["alpha"]).await;
    let mut hooks = webhooks_client(app.addr).await;
    let url = || "http://127.0.0.1:9/hook".to_owned();

    let everywhere = hooks
        .create_webhook(with_key(&whole, webhook_request(url(), &["run.terminal"])))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(everywhere.project_id, "");
    // Without a project, the key's only one.
    let own = hooks
        .create_webhook(with_key(&alpha, webhook_request(url(), &["run.terminal"])))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(own.project_id, "alpha");
    let mut beta = webhook_request(url(), &["run.terminal"]);
    beta.project_id = "beta".into();
    let refused = hooks
        .create_webhook(with_key(&alpha, beta))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let seen: Vec<String> = hooks
        .list_webhooks(with_key(&alpha, proto::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks
        .into_iter()
        .map(|w| w.webhook_id)
        .collect();
    assert_eq!(seen, vec![own.webhook_id.clone()]);
    let hidden = hooks
        .delete_webhook(with_key(
            &alpha,
            proto::DeleteWebhookRequest {
                webhook_id: everywhere.webhook_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    let all = hooks
        .list_webhooks(with_key(&whole, proto::ListWebhooksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(all.len(), 2, "the whole-tenant key sees both");
}

fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII key"),
    );
    request
}

/// A tenant names a webhook's URL, and the manager sends from inside the operator's
/// network: by default nothing is sent to a loopback, private, link-local or other
/// non-public address (the manager's own ports, the pod network, a cloud metadata
/// service), whose answers would come back in `last_error`. A URL naming one is refused
/// by field and creates nothing; a webhook that has one anyway (created while a replica
/// allowed them) is refused at every attempt, before any connection is made.
#[tokio::test]
async fn webhooks_reach_only_public_addresses_unless_allowed() {
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let mut app = TestApp::spawn_with(|s| s.webhook_private_targets = false).await;
    let mut hooks = webhooks_client(app.addr).await;
    let refused = [
        receiver.url("/hook"),
        "http://localhost:9/hook".into(),
        "http://app.localhost./".into(),
        "http://[::1]:9/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://10.1.2.3/".into(),
        "http://172.16.0.1/".into(),
        "http://192.168.1.1/".into(),
        "http://100.64.0.1/".into(),
        "http://0.0.0.0:9/".into(),
        "http://[fd00::1]/".into(),
        "http://[fe80::1]/".into(),
        "http://[::ffff:127.0.0.1]/".into(),
        // 127.0.0.1 written as one number: URLs are read as browsers read them.
        "http://2130706433/".into(),
    ];
    for url in refused {
        let err = hooks
            .create_webhook(webhook_request(url.clone(), &["run.created"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{url}: {err:?}");
        assert!(
            err.message().starts_with("invalid url:")
                && err.message().contains("--webhook-private-targets"),
            "{url}: {}",
            err.message()
        );
    }
    let listed = hooks
        .list_webhooks(proto::ListWebhooksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.webhooks.is_empty(), "{listed:?}");
    // A public address is taken (and removed again: nothing is sent to it here).
    let public = create_webhook(
        &mut hooks,
        webhook_request(
            "https://hooks.example.com/agentrun".into(),
            &["run.created"],
        ),
    )
    .await;
    hooks
        .delete_webhook(proto::DeleteWebhookRequest {
            webhook_id: public.webhook_id,
        })
        .await
        .unwrap();

    // A webhook on loopback, as a replica allowing private targets would have stored it.
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let hook = agentrun_manager::store::webhooks::create(
        &pool,
        &agentrun_manager::store::Tenant("default".into()),
        &agentrun_manager::store::webhooks::NewWebhook {
            url: receiver.url("/hook"),
            event_types: vec!["run.created".into()],
            project_id: String::new(),
            secret: SECRET.into(),
        },
        100,
    )
    .await
    .expect("store a webhook");
    app.runs
        .create_run(run_request("to loopback"))
        .await
        .unwrap();
    let hook_id = hook.id.to_string();
    let refused = wait_for("an attempt refused before sending", LONG, || {
        let mut hooks = hooks.clone();
        let hook_id = hook_id.clone();
        async move {
            let all = deliveries(&mut hooks, &hook_id).await;
            all.into_iter().find(|d| d.attempts >= 2)
        }
    })
    .await;
    assert_eq!(status(&refused), DeliveryStatus::Pending, "{refused:?}");
    assert!(
        refused
            .last_error
            .contains("127.0.0.1 is a loopback address")
            && refused.last_error.contains("--webhook-private-targets"),
        "{}",
        refused.last_error
    );
    assert!(receiver.requests().is_empty(), "{:?}", receiver.requests());
}

/// Bad input is INVALID_ARGUMENT naming the field and changes nothing; the per-tenant
/// count is RESOURCE_EXHAUSTED naming the limit; a generated secret is returned once.
#[tokio::test]
async fn bad_input_is_refused_by_field() {
    let app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let good = || webhook_request("http://127.0.0.1:9/hook".into(), &["run.terminal"]);
    let long_url = format!("https://example.com/{}", "a".repeat(2048));
    let cases: Vec<(&str, proto::CreateWebhookRequest)> = vec![
        (
            "url",
            proto::CreateWebhookRequest {
                url: String::new(),
                ..good()
            },
        ),
        (
            "url",
            proto::CreateWebhookRequest {
                url: "not a url".into(),
                ..good()
            },
        ),
        (
            "url",
            proto::CreateWebhookRequest {
                url: "ftp://example.com/x".into(),
                ..good()
            },
        ),
        (
            "url",
            proto::CreateWebhookRequest {
                url: long_url,
                ..good()
            },
        ),
        (
            "event_types",
            proto::CreateWebhookRequest {
                event_types: vec![],
                ..good()
            },
        ),
        (
            "event_types[1]",
            proto::CreateWebhookRequest {
                event_types: vec!["run.terminal".into(), "content.delta".into()],
                ..good()
            },
        ),
        (
            "event_types[0]",
            proto::CreateWebhookRequest {
                event_types: vec!["run.exploded".into()],
                ..good()
            },
        ),
        (
            "secret",
            proto::CreateWebhookRequest {
                secret: "short".into(),
                ..good()
            },
        ),
        (
            "secret",
            proto::CreateWebhookRequest {
                secret: "x".repeat(257),
                ..good()
            },
        ),
        (
            "project_id",
            proto::CreateWebhookRequest {
                project_id: "has space".into(),
                ..good()
            },
        ),
    ];
    for (field, request) in cases {
        let err = hooks.create_webhook(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("invalid {field}:")),
            "{field}: {}",
            err.message()
        );
    }
    for (field, id) in [("webhook_id", ""), ("webhook_id", "nope")] {
        let err = hooks
            .delete_webhook(proto::DeleteWebhookRequest {
                webhook_id: id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    let listed = hooks
        .list_webhooks(proto::ListWebhooksRequest {})
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert!(listed.is_empty(), "refused requests changed nothing");

    // A generated secret: returned at creation, never listed.
    let created = hooks
        .create_webhook(proto::CreateWebhookRequest {
            secret: String::new(),
            ..good()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.secret.len() >= 64, "{}", created.secret);
    let id = created.webhook.unwrap().webhook_id;
    for (field, page_size, token) in [("page_size", 501, ""), ("page_token", 0, "x")] {
        let err = hooks
            .list_deliveries(proto::ListDeliveriesRequest {
                webhook_id: id.clone(),
                page_size,
                page_token: token.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }

    // The per-tenant limit.
    for _ in 1..100 {
        hooks
            .create_webhook(good())
            .await
            .expect("within the limit");
    }
    let over = hooks.create_webhook(good()).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(
        over.message().contains("tenant_webhooks"),
        "{}",
        over.message()
    );
    let listed = hooks
        .list_webhooks(proto::ListWebhooksRequest {})
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(listed.len(), 100);
    // Another tenant has its own count.
    hooks
        .create_webhook(as_tenant("other", good()))
        .await
        .expect("another tenant's first webhook");
}

/// Two manager processes on one database: every event is delivered once, by id, though
/// both replicas' workers take due deliveries.
#[tokio::test]
async fn two_replicas_deliver_each_event_once() {
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let url = fresh_database().await;
    let a = ManagerProcess::start(&url, &[]).await;
    let b = ManagerProcess::start(&url, &[]).await;
    let mut hooks = webhooks_client(a.addr).await;
    let hook = create_webhook(
        &mut hooks,
        webhook_request(receiver.url("/both"), &["run.created"]),
    )
    .await;
    let mut runs_a =
        agentrun_shared::proto::run_service_client::RunServiceClient::new(a.channel().await);
    let mut runs_b =
        agentrun_shared::proto::run_service_client::RunServiceClient::new(b.channel().await);
    let mut created = HashSet::new();
    for i in 0..40 {
        let client = if i % 2 == 0 { &mut runs_a } else { &mut runs_b };
        let run = client
            .create_run(run_request(&format!("run {i}")))
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        created.insert(run.run_id);
    }
    wait_for("every run's delivery", LONG, || async {
        (receiver.processed().len() >= created.len()).then_some(())
    })
    .await;
    let all = deliveries(&mut hooks, &hook.webhook_id).await;
    assert_eq!(all.len(), created.len());
    assert!(
        all.iter()
            .all(|d| status(d) == DeliveryStatus::Delivered && d.attempts == 1)
    );
    let requests = receiver.requests();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for r in &requests {
        *per_id.entry(r.delivery_id.as_str()).or_default() += 1;
    }
    assert!(
        per_id.values().all(|n| *n == 1),
        "each id sent once: {per_id:?}"
    );
    let delivered_runs: HashSet<String> = requests
        .iter()
        .map(|r| r.json()["run_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered_runs, created);
    assert_eq!(receiver.duplicates(), 0);
}

/// Bounded: a replica has at most `MAX_IN_FLIGHT_PER_WEBHOOK` attempts open for one
/// webhook (a hanging receiver never takes the slots of the others) and
/// `MAX_IN_FLIGHT` in all, however many deliveries are due; and of a failed answer's
/// body only a short excerpt is read and kept.
#[tokio::test]
async fn attempts_in_flight_and_answers_read_are_bounded() {
    use agentrun_manager::webhooks::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_WEBHOOK};
    let hanging = Receiver::start(vec![], Answer::Hang).await;
    let mut app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let hook = create_webhook(
        &mut hooks,
        webhook_request(hanging.url("/hang"), &["run.created"]),
    )
    .await;
    let runs = MAX_IN_FLIGHT_PER_WEBHOOK + 4;
    for i in 0..runs {
        create(&mut app, &format!("run {i}")).await;
    }
    wait_for(
        "the receiver to hold a full set of attempts",
        LONG,
        || async { (hanging.requests().len() >= MAX_IN_FLIGHT_PER_WEBHOOK).then_some(()) },
    )
    .await;

    // Meanwhile another webhook's receiver answers a 500 with a 64 MiB body: its attempt
    // is made at once, and recorded with a short excerpt.
    let huge = Receiver::start(vec![], Answer::Huge(500)).await;
    let other = create_webhook(
        &mut hooks,
        webhook_request(huge.url("/huge"), &["run.created"]),
    )
    .await;
    let started = Instant::now();
    create(&mut app, "huge answer").await;
    let failed = wait_for("the failed attempt recorded", LONG, || {
        let mut hooks = hooks.clone();
        let id = other.webhook_id.clone();
        async move {
            deliveries(&mut hooks, &id)
                .await
                .into_iter()
                .find(|d| d.last_status_code == 500)
        }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        failed.last_error.len() <= 1024,
        "{}",
        failed.last_error.len()
    );
    assert!(failed.last_error.contains("500"), "{}", failed.last_error);
    assert_eq!(status(&failed), DeliveryStatus::Pending);

    // Well inside the 10 s request timeout, the hanging webhook still has no more.
    assert_eq!(hanging.requests().len(), MAX_IN_FLIGHT_PER_WEBHOOK);
    let listed = deliveries(&mut hooks, &hook.webhook_id).await;
    assert_eq!(listed.len(), runs + 1);
    assert_eq!(
        listed.iter().filter(|d| d.attempts == 1).count(),
        MAX_IN_FLIGHT_PER_WEBHOOK
    );
    for id in [hook.webhook_id, other.webhook_id] {
        hooks
            .delete_webhook(proto::DeleteWebhookRequest { webhook_id: id })
            .await
            .unwrap();
    }

    // Enough hanging webhooks to fill every slot: no more than MAX_IN_FLIGHT at once. A
    // fresh manager, whose slots the attempts above do not hold.
    let mut app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let all = Receiver::start(vec![], Answer::Hang).await;
    let webhooks = MAX_IN_FLIGHT / MAX_IN_FLIGHT_PER_WEBHOOK + 1;
    for i in 0..webhooks {
        create_webhook(
            &mut hooks,
            webhook_request(all.url(&format!("/{i}")), &["run.created"]),
        )
        .await;
    }
    for i in 0..MAX_IN_FLIGHT_PER_WEBHOOK {
        create(&mut app, &format!("fill {i}")).await;
    }
    wait_for("every slot held", LONG, || async {
        (all.requests().len() >= MAX_IN_FLIGHT).then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < deadline {
        assert_eq!(all.requests().len(), MAX_IN_FLIGHT, "attempts in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Durable across a crash: a replica killed while its attempt hangs leaves the delivery
/// to another, which sends it again (same id) once the attempt's lease has passed.
#[tokio::test]
async fn a_crashed_replicas_attempt_is_made_again_by_another() {
    let receiver = Receiver::start(vec![Answer::Hang], Answer::Status(200)).await;
    let url = fresh_database().await;
    let mut a = ManagerProcess::start(&url, &[]).await;
    let mut hooks = webhooks_client(a.addr).await;
    let hook = create_webhook(
        &mut hooks,
        webhook_request(receiver.url("/crash"), &["run.created"]),
    )
    .await;
    let mut runs =
        agentrun_shared::proto::run_service_client::RunServiceClient::new(a.channel().await);
    runs.create_run(run_request("survive"))
        .await
        .expect("create run");
    wait_for("the first attempt to hang", LONG, || async {
        (!receiver.requests().is_empty()).then_some(())
    })
    .await;
    a.kill();

    let b = ManagerProcess::start(&url, &[]).await;
    let hooks = webhooks_client(b.addr).await;
    let delivered = wait_for(
        "another replica to deliver it",
        Duration::from_secs(60),
        || {
            let mut hooks = hooks.clone();
            let id = hook.webhook_id.clone();
            async move {
                let all = deliveries(&mut hooks, &id).await;
                (all.len() == 1 && status(&all[0]) == DeliveryStatus::Delivered)
                    .then(|| all[0].clone())
            }
        },
    )
    .await;
    assert_eq!(delivered.attempts, 2, "{delivered:?}");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests
            .iter()
            .all(|r| r.delivery_id == delivered.delivery_id)
    );
    assert_eq!(receiver.processed(), vec![delivered.delivery_id]);
}

/// Finished deliveries are pruned once older than the keep period (the worker prunes
/// with `KEEP_FINISHED`; here the store call runs with none), pending ones never.
#[tokio::test]
async fn finished_deliveries_are_pruned_pending_ones_kept() {
    use agentrun_manager::store::webhooks::prune;
    let ok = Receiver::start(vec![], Answer::Status(200)).await;
    let failing = Receiver::start(vec![], Answer::Status(500)).await;
    let mut app = TestApp::spawn().await;
    let mut hooks = webhooks_client(app.addr).await;
    let delivered =
        create_webhook(&mut hooks, webhook_request(ok.url("/ok"), &["run.created"])).await;
    let retrying = create_webhook(
        &mut hooks,
        webhook_request(failing.url("/no"), &["run.created"]),
    )
    .await;
    create(&mut app, "prune me").await;
    wait_for("one delivered, one retrying", LONG, || {
        let mut hooks = hooks.clone();
        let (a, b) = (delivered.webhook_id.clone(), retrying.webhook_id.clone());
        async move {
            let done = deliveries(&mut hooks, &a).await;
            let pending = deliveries(&mut hooks, &b).await;
            (done.len() == 1
                && status(&done[0]) == DeliveryStatus::Delivered
                && pending.len() == 1
                && pending[0].attempts >= 1)
                .then_some(())
        }
    })
    .await;
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    let kept_week = prune(&client, Duration::from_secs(7 * 24 * 3600), 1000)
        .await
        .expect("prune");
    assert_eq!(kept_week, 0, "nothing is a week old");
    let pruned = prune(&client, Duration::ZERO, 1000).await.expect("prune");
    assert_eq!(pruned, 1);
    assert!(
        deliveries(&mut hooks, &delivered.webhook_id)
            .await
            .is_empty()
    );
    assert_eq!(deliveries(&mut hooks, &retrying.webhook_id).await.len(), 1);
}
