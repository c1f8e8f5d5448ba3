//! The web UI's port (`--ui-listen`), spoken to as a browser does, over plain HTTP/1.1:
//! the embedded app under its base path, and gRPC-Web to the client and admin services
//! with the same keys and tenant scoping as the gRPC port (the runner service is not
//! there). The app itself is tested in a real browser by `scripts/web-test.sh`.

use agentrun_manager::Application;
use agentrun_manager::config::AuthMode;
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto;
use agentrun_tests::*;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: std::time::Duration = std::time::Duration::from_secs(30);

/// A manager serving the UI on a free port under `base_path`.
async fn with_ui(base_path: &str, auth: AuthMode) -> (TestApp, String) {
    let base = base_path.to_owned();
    let app = TestApp::spawn_with(|s| {
        s.ui_listen = "127.0.0.1:0".into();
        s.ui_base_path = base;
        s.auth = auth;
    })
    .await;
    let url = app.ui_url.clone().expect("the UI is served");
    (app, url)
}

/// An HTTP/1.1 response, its body de-chunked.
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request (`Connection: close`) to `url` + `path` and reads the whole answer.
async fn http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let authority = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("host:port");
    let mut stream = TcpStream::connect(authority)
        .await
        .expect("connect to the UI");
    // The Host header names the authority, unless the test names another.
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("host: {authority}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(LONG, stream.read_to_end(&mut raw))
        .await
        .expect("the UI answers in time")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let status = head[9..12].parse().expect("a status code");
    let mut response = Response {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    };
    if response
        .header("transfer-encoding")
        .is_some_and(|te| te.contains("chunked"))
    {
        response.body = dechunk(&response.body);
    }
    response
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16)
            .expect("hex chunk size");
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[line_end + 2 + size + 2..];
    }
}

/// `message` as the one data frame of a gRPC-Web request body.
fn grpc_web_frame<M: Message>(message: &M) -> Vec<u8> {
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    body
}

/// A gRPC-Web call: its messages and its status (from the trailer frame, or the headers
/// of a trailers-only answer).
async fn grpc_web<M: Message>(
    url: &str,
    method: &str,
    message: &M,
    key: Option<&str>,
) -> (Vec<Vec<u8>>, i32, String) {
    let body = grpc_web_frame(message);
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
    ];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    let path = format!("{}{method}", url_path(url));
    let response = http(url, "POST", &path, &headers, &body).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let (mut messages, mut status, mut text) = (Vec::new(), None, String::new());
    if let Some(code) = response.header("grpc-status") {
        status = Some(code.parse().unwrap());
        text = response
            .header("grpc-message")
            .unwrap_or_default()
            .to_owned();
    }
    let mut rest = &response.body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let frame = &rest[5..5 + len];
        if rest[0] & 0x80 == 0 {
            messages.push(frame.to_vec());
        } else {
            for line in String::from_utf8_lossy(frame).lines() {
                match line.split_once(':') {
                    Some(("grpc-status", code)) => status = Some(code.trim().parse().unwrap()),
                    Some(("grpc-message", message)) => text = message.trim().to_owned(),
                    _ => {}
                }
            }
        }
        rest = &rest[5 + len..];
    }
    (messages, status.expect("a grpc-status"), text)
}

/// The path part of a UI URL (its base path).
fn url_path(url: &str) -> String {
    let rest = url.trim_start_matches("http://");
    rest[rest.find('/').unwrap_or(rest.len())..].to_owned()
}

async fn key(app: &TestApp, tenant: &str, role: Role) -> String {
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    api_keys::create(&client, tenant, role, &[], "ui test", None)
        .await
        .expect("create key")
        .key
}

#[tokio::test]
async fn the_app_is_served_under_its_base_path() {
    let (_app, url) = with_ui("/agentrun", AuthMode::Disabled).await;
    assert!(url.ends_with("/agentrun/"), "{url}");

    let page = http(&url, "GET", "/agentrun/", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.text().contains(r#"<base href="/agentrun/">"#),
        "{}",
        page.text()
    );
    // The app routes by fragment; a deep link still gets the page.
    let deep = http(&url, "GET", "/agentrun/runs/anything", &[], b"").await;
    assert_eq!((deep.status, deep.text()), (200, page.text()));
    let script = http(&url, "GET", "/agentrun/assets/app.js", &[], b"").await;
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert_eq!(script.body, include_bytes!("../../web/dist/assets/app.js"));
    assert_eq!(
        http(&url, "GET", "/agentrun/assets/nope.js", &[], b"")
            .await
            .status,
        404
    );
    let bare = http(&url, "GET", "/agentrun", &[], b"").await;
    assert_eq!(bare.status, 308);
    assert_eq!(bare.header("location"), Some("/agentrun/"));
    assert_eq!(http(&url, "GET", "/elsewhere", &[], b"").await.status, 404);
}

#[tokio::test]
async fn grpc_web_reaches_the_client_and_admin_services_but_not_the_runner_service() {
    let (app, url) = with_ui("/", AuthMode::Disabled).await;
    let (messages, status, text) = grpc_web(
        &url,
        "agentrun.v1.RunService/CreateRun",
        &run_request("from the browser"),
        None,
    )
    .await;
    assert_eq!(status, 0, "{text}");
    let created = proto::CreateRunResponse::decode(&messages[0][..]).unwrap();
    let run_id = created.run.unwrap().run_id;
    let mut runs = app.runs.clone();
    let stored = runs
        .get_run(proto::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .expect("the run exists on the gRPC port too");
    assert_eq!(stored.into_inner().run.unwrap().run_id, run_id);

    // A server stream over HTTP/1.1: the run's first events, then its end once
    // cancelled (the call returns when the stream ends).
    runs.cancel_run(proto::CancelRunRequest {
        run_id: run_id.clone(),
        reason: "done".into(),
    })
    .await
    .unwrap();
    let (events, status, text) = grpc_web(
        &url,
        "agentrun.v1.RunService/WatchRun",
        &proto::WatchRunRequest {
            run_id,
            after_seq: 0,
        },
        None,
    )
    .await;
    assert_eq!(status, 0, "{text}");
    let types: Vec<String> = events
        .iter()
        .map(|e| proto::Event::decode(&e[..]).unwrap().r#type)
        .collect();
    assert_eq!(
        types.first().map(String::as_str),
        Some("run.created"),
        "{types:?}"
    );
    assert_eq!(
        types.last().map(String::as_str),
        Some("run.terminal"),
        "{types:?}"
    );

    let (_, status, _) = grpc_web(
        &url,
        "agentrun.v1.AdminService/ListRunners",
        &proto::ListRunnersRequest::default(),
        None,
    )
    .await;
    assert_eq!(status, 0);
    let (_, status, _) = grpc_web(
        &url,
        "agentrun.v1.RunnerService/Heartbeat",
        &proto::HeartbeatRequest::default(),
        None,
    )
    .await;
    assert_eq!(status, tonic::Code::Unimplemented as i32);
}

#[tokio::test]
async fn grpc_web_calls_need_the_same_keys_and_see_only_their_tenant() {
    let (app, url) = with_ui("/", AuthMode::Required).await;
    let create = |key| {
        let url = url.clone();
        async move {
            grpc_web(
                &url,
                "agentrun.v1.RunService/CreateRun",
                &run_request("hi"),
                key,
            )
            .await
        }
    };
    let (_, status, text) = create(None).await;
    assert_eq!(status, tonic::Code::Unauthenticated as i32, "{text}");
    let (_, status, _) = create(Some("ark_wrong")).await;
    assert_eq!(status, tonic::Code::Unauthenticated as i32);

    let alice = key(&app, "alice", Role::Client).await;
    let bob = key(&app, "bob", Role::Client).await;
    let (messages, status, text) = create(Some(&alice)).await;
    assert_eq!(status, 0, "{text}");
    let run_id = proto::CreateRunResponse::decode(&messages[0][..])
        .unwrap()
        .run
        .unwrap()
        .run_id;
    let get = |run_id: String, key: String| {
        let url = url.clone();
        async move {
            grpc_web(
                &url,
                "agentrun.v1.RunService/GetRun",
                &proto::GetRunRequest { run_id },
                Some(&key),
            )
            .await
        }
    };
    assert_eq!(get(run_id.clone(), alice.clone()).await.1, 0);
    let (_, theirs, theirs_text) = get(run_id, bob.clone()).await;
    let (_, unknown, unknown_text) = get(uuid::Uuid::new_v4().to_string(), bob).await;
    assert_eq!(theirs, tonic::Code::NotFound as i32);
    assert_eq!(
        (
            theirs,
            theirs_text.replace(|c: char| c.is_ascii_hexdigit(), "")
        ),
        (
            unknown,
            unknown_text.replace(|c: char| c.is_ascii_hexdigit(), "")
        )
    );
    // A client key is not an admin key, on this port as on the other.
    let (_, status, _) = grpc_web(
        &url,
        "agentrun.v1.AdminService/ListRunners",
        &proto::ListRunnersRequest::default(),
        Some(&alice),
    )
    .await;
    assert_eq!(status, tonic::Code::PermissionDenied as i32);
}

/// Without authentication the UI answers only requests addressed to a loopback name or
/// address. A web page whose name its owner re-points at 127.0.0.1 (DNS rebinding) is
/// same-origin with the UI and sends its own name as Host: it gets neither the app nor
/// the API, or any page a developer visits could create runs, read every log and answer
/// approvals on their `agentrun dev`. With keys, any Host is served (behind an ingress,
/// its name is the Host). The app's pages may not be framed by another site.
#[tokio::test]
async fn without_authentication_the_ui_answers_only_requests_addressed_to_loopback() {
    let (app, url) = with_ui("/", AuthMode::Disabled).await;
    let port = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .expect("a port")
        .to_owned();
    let create = grpc_web_frame(&run_request("from a rebound page"));
    for host in [
        format!("rebound.example.com:{port}"),
        "rebound.example.com".to_owned(),
        format!("192.168.1.20:{port}"),
        format!("localhost.example.com:{port}"),
    ] {
        let page = http(&url, "GET", "/", &[("host", &host)], b"").await;
        assert_eq!(page.status, 403, "{host}: {}", page.head);
        assert!(
            page.text().contains("--auth required") && page.text().contains(&host),
            "{host}: {}",
            page.text()
        );
        let call = http(
            &url,
            "POST",
            "/agentrun.v1.RunService/CreateRun",
            &[
                ("host", &host),
                ("content-type", "application/grpc-web+proto"),
                ("x-grpc-web", "1"),
            ],
            &create,
        )
        .await;
        assert_eq!(call.status, 403, "{host}: {}", call.head);
    }
    let mut runs = app.runs.clone();
    let listed = runs
        .list_runs(proto::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty(), "{listed:?}");

    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost.:{port}"),
        format!("app.localhost:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
    ] {
        let page = http(&url, "GET", "/", &[("host", &host)], b"").await;
        assert_eq!(page.status, 200, "{host}: {}", page.head);
        assert_eq!(
            page.header("x-frame-options"),
            Some("DENY"),
            "{}",
            page.head
        );
        assert!(
            page.header("content-security-policy").is_some_and(|csp| {
                csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'")
            }),
            "{}",
            page.head
        );
    }

    let (_app, url) = with_ui("/", AuthMode::Required).await;
    let page = http(&url, "GET", "/", &[("host", "agentrun.example.com")], b"").await;
    assert_eq!(page.status, 200, "{}", page.head);
}

#[tokio::test]
async fn the_ui_is_refused_off_loopback_without_authentication() {
    let url = fresh_database().await;
    let mut settings = test_settings(&url);
    settings.ui_listen = "0.0.0.0:0".into();
    let err = Application::build(settings)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("--ui-listen"), "{err}");

    let mut settings = test_settings(&url);
    settings.ui_listen = "127.0.0.1:0".into();
    settings.ui_base_path = "/../x".into();
    let err = Application::build(settings)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("--ui-base-path"), "{err}");
}
