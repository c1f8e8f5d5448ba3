//! The operator inbox: ListRequests across a tenant's runs (newest first, paged, by
//! status and run, other tenants' runs answering like unknown ones, each bad field
//! named), and the ListRuns filters the web UI uses (backend profile, labels, creation
//! window), each combined with paging.

use std::collections::HashSet;
use std::time::Duration;

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::cli::agentrun;
use agentrun_tests::*;
use prost_types::Timestamp;
use serde_json::{Value, json};
use tonic::Code;

const LONG: Duration = Duration::from_secs(30);

/// Runs the test plays the runner of: claimed by one unary "runner", each with its first
/// turn started, so requests can be opened on any of them at will.
struct Played {
    runner: proto::RunnerIdentity,
    runs: Vec<(proto::Assignment, i64)>,
}

impl Played {
    /// Creates `n` runs and claims them all.
    async fn start(app: &mut TestApp, n: usize) -> Self {
        for i in 0..n {
            create(app, &format!("inbox run {i}")).await;
        }
        let runner = runner("inbox");
        let mut assignments = claim(app, &runner, n as i32).await;
        // In creation order (run ids are time-ordered).
        assignments.sort_by(|a, b| run_of(a).cmp(run_of(b)));
        let mut played = Self {
            runner,
            runs: assignments.into_iter().map(|a| (a, 1)).collect(),
        };
        for i in 0..n {
            let turn_id = played.runs[i].0.commands[0].command_id.clone();
            played
                .append(app, i, "turn.started", json!({ "turn_id": turn_id }))
                .await;
        }
        played
    }

    fn run_id(&self, i: usize) -> String {
        run_of(&self.runs[i].0).to_owned()
    }

    async fn append(&mut self, app: &mut TestApp, i: usize, event_type: &str, payload: Value) {
        let (assignment, next_seq) = &mut self.runs[i];
        let event = proto::RunnerEvent {
            runner_seq: *next_seq,
            r#type: event_type.into(),
            payload_json: payload.to_string(),
        };
        app.runners
            .append_events(append(&self.runner, assignment, vec![event]))
            .await
            .unwrap_or_else(|e| panic!("{event_type} is stored: {e}"));
        *next_seq += 1;
    }

    /// Opens an approval on run `i`; returns its id.
    async fn open(&mut self, app: &mut TestApp, i: usize) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let payload = json!({
            "request_id": request_id,
            "kind": "command",
            "detail": {"command": format!("deploy {request_id}")},
            "options": ["accept", "decline"],
        });
        self.append(app, i, "request.opened", payload).await;
        request_id
    }
}

fn run_of(a: &proto::Assignment) -> &str {
    &a.run.as_ref().expect("assignment has a run").run_id
}

fn list(run_id: &str, statuses: &[&str], page_size: i32) -> proto::ListRequestsRequest {
    proto::ListRequestsRequest {
        run_id: run_id.into(),
        statuses: statuses.iter().map(|s| (*s).to_owned()).collect(),
        page_size,
        page_token: String::new(),
    }
}

async fn list_requests(
    app: &mut TestApp,
    request: proto::ListRequestsRequest,
) -> proto::ListRequestsResponse {
    app.runs
        .list_requests(request)
        .await
        .expect("list requests")
        .into_inner()
}

/// Every page of a listing, following next_page_token; returns the pages' sizes too.
async fn all_pages(
    app: &mut TestApp,
    mut request: proto::ListRequestsRequest,
) -> (Vec<proto::Request>, Vec<usize>) {
    let (mut all, mut sizes) = (Vec::new(), Vec::new());
    loop {
        let page = list_requests(app, request.clone()).await;
        sizes.push(page.requests.len());
        all.extend(page.requests);
        if page.next_page_token.is_empty() {
            return (all, sizes);
        }
        assert!(sizes.len() < 100, "paging does not end");
        request.page_token = page.next_page_token;
    }
}

fn ids(requests: &[proto::Request]) -> Vec<String> {
    requests.iter().map(|r| r.request_id.clone()).collect()
}

#[tokio::test]
async fn open_requests_of_every_run_are_listed_newest_first_in_pages() {
    let mut app = TestApp::spawn().await;
    let mut played = Played::start(&mut app, 2).await;
    // Interleaved across the two runs: a1, b1, a2, b2, a3.
    let mut opened = Vec::new();
    for i in [0, 1, 0, 1, 0] {
        opened.push((played.open(&mut app, i).await, played.run_id(i)));
    }
    let newest_first: Vec<String> = opened.iter().rev().map(|(id, _)| id.clone()).collect();

    let (listed, sizes) = all_pages(&mut app, list("", &[], 2)).await;
    assert_eq!(ids(&listed), newest_first, "newest first, across runs");
    assert_eq!(sizes, vec![2, 2, 1], "pages of page_size");
    for request in &listed {
        let (_, run_id) = opened
            .iter()
            .find(|(id, _)| *id == request.request_id)
            .expect("an opened request");
        assert_eq!(&request.run_id, run_id);
        assert_eq!(request.status, "open");
        assert_eq!(request.kind, "command");
        assert_eq!(request.options, vec!["accept", "decline"]);
        assert_eq!(
            request.turn_id,
            played
                .runs
                .iter()
                .find(|(a, _)| run_of(a) == run_id)
                .unwrap()
                .0
                .commands[0]
                .command_id
        );
        let detail: Value = serde_json::from_str(&request.detail_json).expect("detail is JSON");
        assert_eq!(detail["command"], format!("deploy {}", request.request_id));
        assert!(request.created_at.is_some() && request.deadline.is_some());
        assert!(request.resolved_at.is_none() && request.resolution_json.is_empty());
    }

    // The default page size holds them all, with no token.
    let one_page = list_requests(&mut app, list("", &[], 0)).await;
    assert_eq!(ids(&one_page.requests), newest_first);
    assert!(one_page.next_page_token.is_empty());

    // One run's requests only, paged as well.
    let b = played.run_id(1);
    let (of_b, sizes) = all_pages(&mut app, list(&b, &[], 1)).await;
    let b_newest_first: Vec<String> = opened
        .iter()
        .rev()
        .filter(|(_, run)| *run == b)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids(&of_b), b_newest_first);
    assert_eq!(sizes.iter().sum::<usize>(), 2);
}

#[tokio::test]
async fn a_resolved_request_leaves_the_open_listing_and_is_listed_as_resolved() {
    let mut app = TestApp::spawn().await;
    let mut played = Played::start(&mut app, 2).await;
    let first = played.open(&mut app, 0).await;
    let second = played.open(&mut app, 1).await;
    let third = played.open(&mut app, 0).await;

    let resolved = app
        .runs
        .resolve_request(proto::ResolveRequestRequest {
            run_id: played.run_id(0),
            request_id: first.clone(),
            decision: "accept".into(),
            ..Default::default()
        })
        .await
        .expect("resolve")
        .into_inner();
    assert!(resolved.resolved_now);

    let open = list_requests(&mut app, list("", &[], 0)).await;
    assert_eq!(ids(&open.requests), vec![third.clone(), second.clone()]);
    let explicit_open = list_requests(&mut app, list("", &["open"], 0)).await;
    assert_eq!(ids(&explicit_open.requests), ids(&open.requests));

    let done = list_requests(&mut app, list("", &["resolved"], 0)).await;
    assert_eq!(ids(&done.requests), vec![first.clone()]);
    // Listed exactly as ResolveRequest returned it.
    assert_eq!(done.requests[0], resolved.request.expect("request"));
    assert_eq!(done.requests[0].status, "resolved");
    assert!(done.requests[0].resolution_json.contains("accept"));

    let both = list_requests(&mut app, list("", &["resolved", "open"], 0)).await;
    assert_eq!(ids(&both.requests), vec![third.clone(), second, first]);
    let of_b = list_requests(&mut app, list(&played.run_id(1), &["resolved"], 0)).await;
    assert!(of_b.requests.is_empty(), "{:?}", of_b.requests);

    // Cancelling a run cancels its open requests: they move to `cancelled`.
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: played.run_id(0),
            ..Default::default()
        })
        .await
        .expect("cancel run");
    let finish_a = finish(&played.runner, &played.runs[0].0, RunStatus::Cancelled);
    app.runners
        .finish_run(finish_a)
        .await
        .expect("the runner finishes the cancelled run");
    wait_for_run(&app, &played.run_id(0), RunStatus::Cancelled, LONG).await;
    let cancelled = list_requests(&mut app, list("", &["cancelled"], 0)).await;
    assert_eq!(ids(&cancelled.requests), vec![third]);
    assert_eq!(cancelled.requests[0].status, "cancelled");
}

#[tokio::test]
async fn the_scripted_approval_cue_shows_in_the_inbox_until_answered() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "inbox-runner", &[]);
    let run_id = create(&mut app, "[approval] deploy").await;
    let client = app.runs.clone();
    let request = wait_for("the approval in the inbox", LONG, || {
        let mut client = client.clone();
        async move {
            let page = client
                .list_requests(list("", &[], 0))
                .await
                .ok()?
                .into_inner();
            page.requests.into_iter().next()
        }
    })
    .await;
    assert_eq!(request.run_id, run_id);
    assert_eq!(request.kind, "command");
    app.runs
        .resolve_request(proto::ResolveRequestRequest {
            run_id: run_id.clone(),
            request_id: request.request_id.clone(),
            decision: "accept".into(),
            ..Default::default()
        })
        .await
        .expect("resolve");
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    assert!(
        list_requests(&mut app, list("", &[], 0))
            .await
            .requests
            .is_empty()
    );
    let resolved = list_requests(&mut app, list(&run_id, &["resolved"], 0)).await;
    assert_eq!(ids(&resolved.requests), vec![request.request_id]);
}

/// `(code, message, details)` of a refusal: what a caller learns from it, byte for byte.
fn answer<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String, Vec<u8>) {
    let status = result.expect_err("a refusal");
    (
        status.code(),
        status.message().to_owned(),
        status.details().to_vec(),
    )
}

#[tokio::test]
async fn another_tenants_run_and_requests_answer_like_unknown_ones() {
    let mut app = TestApp::spawn().await;
    let mut played = Played::start(&mut app, 1).await;
    let theirs = played.open(&mut app, 0).await;
    let their_run = played.run_id(0);
    assert_eq!(
        list_requests(&mut app, list("", &[], 0))
            .await
            .requests
            .len(),
        1
    );

    let unknown_run = uuid::Uuid::now_v7().to_string();
    let unknown_request = uuid::Uuid::new_v4().to_string();
    let mut b = app.runs.clone();
    let mut ask = async |request: proto::ListRequestsRequest| {
        answer(b.list_requests(as_tenant("tenant-b", request)).await)
    };
    let by_their_run = ask(list(&their_run, &[], 0)).await;
    let by_unknown_run = ask(list(&unknown_run, &[], 0)).await;
    assert_eq!(by_their_run.0, Code::NotFound);
    assert_eq!(by_their_run, by_unknown_run, "A's run vs an unknown run");

    let token = |page_token: &str| proto::ListRequestsRequest {
        page_token: page_token.into(),
        ..list("", &[], 0)
    };
    let by_their_token = ask(token(&theirs)).await;
    let by_unknown_token = ask(token(&unknown_request)).await;
    assert_eq!(by_their_token.0, Code::InvalidArgument);
    assert_eq!(
        by_their_token, by_unknown_token,
        "A's request vs an unknown one"
    );

    // B's inbox is empty, whatever the statuses.
    let everything = app
        .runs
        .list_requests(as_tenant(
            "tenant-b",
            list("", &["open", "resolved", "cancelled", "expired"], 0),
        ))
        .await
        .expect("B lists its own")
        .into_inner();
    assert!(everything.requests.is_empty(), "{:?}", everything.requests);
}

/// Asserts an INVALID_ARGUMENT that names `field`.
fn assert_names<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = result.expect_err(&format!("{field} is refused"));
    assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    assert!(
        status.message().starts_with(&format!("invalid {field}:")),
        "{field}: {}",
        status.message()
    );
}

fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

#[tokio::test]
async fn bad_listing_fields_are_named() {
    let mut app = TestApp::spawn().await;
    let mut played = Played::start(&mut app, 1).await;
    played.open(&mut app, 0).await;
    let ok = list("", &[], 0);
    let bad_requests = [
        (
            "run_id",
            proto::ListRequestsRequest {
                run_id: "not-a-uuid".into(),
                ..ok.clone()
            },
        ),
        ("statuses[1]", list("", &["open", "answered"], 0)),
        ("statuses[0]", list("", &["OPEN"], 0)),
        ("statuses", list("", &["open"; 65], 0)),
        ("page_size", list("", &[], 501)),
        ("page_size", list("", &[], -1)),
        (
            "page_token",
            proto::ListRequestsRequest {
                page_token: "garbage".into(),
                ..ok.clone()
            },
        ),
        (
            "page_token",
            proto::ListRequestsRequest {
                page_token: uuid::Uuid::new_v4().to_string(),
                ..ok.clone()
            },
        ),
    ];
    for (field, request) in bad_requests {
        assert_names(app.runs.list_requests(request).await, field);
    }
    assert_eq!(list_requests(&mut app, ok).await.requests.len(), 1);

    let ok = proto::ListRunsRequest::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let bad_runs = [
        (
            "backend_profile",
            proto::ListRunsRequest {
                backend_profile: "two words".into(),
                ..ok.clone()
            },
        ),
        (
            "labels[1]",
            proto::ListRunsRequest {
                labels: vec!["gpu".into(), String::new()],
                ..ok.clone()
            },
        ),
        (
            "labels",
            proto::ListRunsRequest {
                labels: (0..65).map(|i| format!("l{i}")).collect(),
                ..ok.clone()
            },
        ),
        (
            "created_after",
            proto::ListRunsRequest {
                created_after: at(-62_135_596_801, 0),
                ..ok.clone()
            },
        ),
        (
            "created_before",
            proto::ListRunsRequest {
                created_before: at(253_402_300_800, 0),
                ..ok.clone()
            },
        ),
        (
            "created_before",
            proto::ListRunsRequest {
                created_after: at(now, 0),
                created_before: at(now, 0),
                ..ok.clone()
            },
        ),
        (
            "created_before",
            proto::ListRunsRequest {
                created_after: at(now, 0),
                created_before: at(now - 60, 0),
                ..ok.clone()
            },
        ),
    ];
    for (field, request) in bad_runs {
        assert_names(app.runs.list_runs(request).await, field);
    }
}

async fn create_with(
    app: &mut TestApp,
    prompt: &str,
    profile: &str,
    labels: &[&str],
) -> proto::Run {
    app.runs
        .create_run(proto::CreateRunRequest {
            backend_profile: profile.into(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            ..run_request(prompt)
        })
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
}

/// Every run of a ListRuns listing, following next_page_token, and the pages' sizes.
async fn all_runs(
    app: &mut TestApp,
    mut request: proto::ListRunsRequest,
) -> (Vec<String>, Vec<usize>) {
    let (mut all, mut sizes) = (Vec::new(), Vec::new());
    loop {
        let page = app
            .runs
            .list_runs(request.clone())
            .await
            .expect("list runs")
            .into_inner();
        sizes.push(page.runs.len());
        all.extend(page.runs.into_iter().map(|r| r.run_id));
        if page.next_page_token.is_empty() {
            return (all, sizes);
        }
        assert!(sizes.len() < 100, "paging does not end");
        request.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn list_runs_filters_by_profile_labels_and_creation_time_across_pages() {
    let mut app = TestApp::spawn().await;
    // Nothing claims these: no runner is connected.
    let specs: [(&str, &[&str]); 8] = [
        ("scripted", &["gpu", "eu"]),
        ("other", &["gpu", "eu"]),
        ("scripted", &["gpu"]),
        ("scripted", &["eu", "gpu", "big"]),
        ("scripted", &[]),
        ("other", &["eu"]),
        ("scripted", &["gpu", "eu"]),
        ("scripted", &["eu"]),
    ];
    let mut created = Vec::new();
    for (i, (profile, labels)) in specs.iter().enumerate() {
        created.push(create_with(&mut app, &format!("run {i}"), profile, labels).await);
    }
    let newest_first = |keep: &dyn Fn(usize) -> bool| -> Vec<String> {
        (0..created.len())
            .rev()
            .filter(|i| keep(*i))
            .map(|i| created[i].run_id.clone())
            .collect()
    };
    let base = proto::ListRunsRequest {
        page_size: 2,
        ..Default::default()
    };

    let (scripted, sizes) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            backend_profile: "scripted".into(),
            ..base.clone()
        },
    )
    .await;
    assert_eq!(scripted, newest_first(&|i| specs[i].0 == "scripted"));
    // As ever with ListRuns, a full last page still has a token; the page after is empty.
    assert_eq!(sizes, vec![2, 2, 2, 0], "six runs in pages of two");

    let has_all = |i: usize, want: &[&str]| want.iter().all(|l| specs[i].1.contains(l));
    let (gpu_eu, _) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            labels: vec!["eu".into(), "gpu".into()],
            ..base.clone()
        },
    )
    .await;
    assert_eq!(gpu_eu, newest_first(&|i| has_all(i, &["eu", "gpu"])));
    assert_eq!(gpu_eu.len(), 4, "every label must match");

    let (scripted_gpu_eu, _) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            backend_profile: "scripted".into(),
            labels: vec!["gpu".into(), "eu".into()],
            ..base.clone()
        },
    )
    .await;
    assert_eq!(
        scripted_gpu_eu,
        newest_first(&|i| specs[i].0 == "scripted" && has_all(i, &["eu", "gpu"]))
    );
    let none = all_runs(
        &mut app,
        proto::ListRunsRequest {
            labels: vec!["gpu".into(), "nowhere".into()],
            ..base.clone()
        },
    )
    .await;
    assert_eq!(none, (vec![], vec![0]));

    // The window [created[2], created[6]): at or after its start, before its end.
    let created_at = |i: usize| created[i].created_at;
    let (window, sizes) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            created_after: created_at(2),
            created_before: created_at(6),
            ..base.clone()
        },
    )
    .await;
    assert_eq!(window, newest_first(&|i| (2..6).contains(&i)));
    assert_eq!(sizes, vec![2, 2, 0]);
    let (after, _) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            created_after: created_at(5),
            ..base.clone()
        },
    )
    .await;
    assert_eq!(after, newest_first(&|i| i >= 5));
    let (before, _) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            created_before: created_at(1),
            ..base.clone()
        },
    )
    .await;
    assert_eq!(before, newest_first(&|i| i < 1));

    // Everything at once, and with the older filters too.
    let (combined, _) = all_runs(
        &mut app,
        proto::ListRunsRequest {
            backend_profile: "scripted".into(),
            labels: vec!["eu".into()],
            created_after: created_at(1),
            statuses: vec![RunStatus::Pending as i32],
            page_size: 1,
            ..Default::default()
        },
    )
    .await;
    let expected = newest_first(&|i| i >= 1 && specs[i].0 == "scripted" && has_all(i, &["eu"]));
    assert_eq!(combined, expected);
    assert_eq!(combined.iter().collect::<HashSet<_>>().len(), 3);
}

#[tokio::test]
async fn the_cli_lists_open_requests_of_every_run_or_of_one() {
    let mut app = TestApp::spawn().await;
    let mut played = Played::start(&mut app, 2).await;
    let a1 = played.open(&mut app, 0).await;
    let b1 = played.open(&mut app, 1).await;
    let (a, b) = (played.run_id(0), played.run_id(1));

    let listed = agentrun(&app, &["requests"]).await;
    assert_eq!(listed.code(), Some(0), "stderr:\n{}", listed.stderr);
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "a header and two requests:\n{}",
        listed.stdout
    );
    for column in ["ID", "RUN", "KIND", "CREATED", "DEADLINE", "DETAIL"] {
        assert!(lines[0].contains(column), "{}", lines[0]);
    }
    // Newest first, each with its run, kind and detail on one line.
    for (line, (request, run)) in lines[1..].iter().zip([(&b1, &b), (&a1, &a)]) {
        assert!(line.starts_with(request.as_str()), "{line}");
        assert!(line.contains(run.as_str()), "{line}");
        assert!(line.contains("command"), "{line}");
        assert!(line.ends_with(&format!("deploy {request}")), "{line}");
    }

    let of_a = agentrun(&app, &["requests", &a]).await;
    assert_eq!(of_a.code(), Some(0), "stderr:\n{}", of_a.stderr);
    assert_eq!(of_a.stdout.lines().count(), 2, "{}", of_a.stdout);
    assert!(of_a.stdout.lines().nth(1).unwrap().starts_with(&a1));

    let limited = agentrun(&app, &["requests", "--limit", "1"]).await;
    assert_eq!(limited.code(), Some(0), "stderr:\n{}", limited.stderr);
    assert_eq!(limited.stdout.lines().count(), 2, "{}", limited.stdout);
    assert!(
        limited.stderr.contains("more requests exist"),
        "{}",
        limited.stderr
    );

    let none = agentrun(&app, &["requests", "--status", "resolved"]).await;
    assert_eq!(none.code(), Some(0), "stderr:\n{}", none.stderr);
    assert_eq!(
        none.stdout.lines().count(),
        1,
        "only the header: {}",
        none.stdout
    );

    let bad = agentrun(&app, &["requests", "not-a-run"]).await;
    assert_ne!(bad.code(), Some(0));
    assert!(bad.stderr.contains("run_id"), "{}", bad.stderr);
}

/// A page of requests is bounded by bytes as well as by count: requests with large
/// details come in several pages, each under the message limit, every one exactly once.
#[tokio::test]
async fn a_page_of_large_requests_is_cut_by_bytes_and_paging_goes_on() {
    let mut app = TestApp::spawn().await;
    let run_id = app
        .runs
        .create_run(run_request("hold"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    // 20 open requests of 256 KiB each: 5 MiB, more than one response may carry.
    let db = app.db().await;
    db.execute(
        "INSERT INTO requests (id, tenant_id, run_id, kind, detail, status, created_at)
         SELECT gen_random_uuid(), 'default', $1::text::uuid, 'command',
                jsonb_build_object('command', repeat('x', 256 * 1024)), 'open',
                now() - n * interval '1 second'
         FROM generate_series(1, 20) n",
        &[&run_id],
    )
    .await
    .unwrap();
    let first = list_requests(&mut app, list(&run_id, &[], 500)).await;
    assert!(
        first.requests.len() < 20,
        "one page held all {} large requests",
        first.requests.len()
    );
    assert!(
        !first.next_page_token.is_empty(),
        "a cut page says more follow"
    );
    let (all, sizes) = all_pages(&mut app, list(&run_id, &[], 500)).await;
    let unique: HashSet<String> = ids(&all).into_iter().collect();
    assert_eq!((all.len(), unique.len()), (20, 20), "pages {sizes:?}");
}
