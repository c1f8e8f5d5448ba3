//! SessionService: versions, last and active run, per-reader attention, list filters,
//! order and paging, the session event log (trace and output-only), tenant isolation and
//! bad input.

use std::collections::HashSet;

use agentrun_shared::proto::session_service_client::SessionServiceClient;
use agentrun_shared::proto::{self, RunStatus, SessionAttention, SessionStateFilter};
use agentrun_tests::*;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

type Sessions = SessionServiceClient<Channel>;

async fn sessions_client(app: &TestApp) -> Sessions {
    SessionServiceClient::new(connect(app.addr).await)
}

/// Creates a run with a prompt in `session_id` (if any) and returns its id.
async fn create_in(app: &mut TestApp, session_id: Option<&str>, prompt: &str) -> String {
    let mut request = run_request(prompt);
    request.session_id = session_id.unwrap_or_default().into();
    app.runs
        .create_run(request)
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

/// Claims the one pending run, checks it is `run_id`, and returns its assignment.
async fn claim_one(
    app: &mut TestApp,
    runner: &proto::RunnerIdentity,
    run_id: &str,
) -> proto::Assignment {
    let assignment = claim(app, runner, 1).await.remove(0);
    assert_eq!(assignment.run.as_ref().unwrap().run_id, run_id);
    assignment
}

async fn end(
    app: &mut TestApp,
    runner: &proto::RunnerIdentity,
    a: &proto::Assignment,
    status: RunStatus,
) {
    app.runners
        .finish_run(finish(runner, a, status))
        .await
        .expect("finish run");
}

async fn get(sessions: &mut Sessions, session_id: &str, reader: &str) -> proto::SessionView {
    sessions
        .get_session(proto::GetSessionRequest {
            session_id: session_id.into(),
            reader: reader.into(),
        })
        .await
        .expect("get session")
        .into_inner()
        .session
        .expect("session view")
}

async fn mark_read(
    sessions: &mut Sessions,
    session_id: &str,
    reader: &str,
    version: i64,
) -> proto::SessionView {
    sessions
        .mark_session_read(proto::MarkSessionReadRequest {
            session_id: session_id.into(),
            reader: reader.into(),
            version,
        })
        .await
        .expect("mark session read")
        .into_inner()
        .session
        .expect("session view")
}

fn attention(v: &proto::SessionView) -> SessionAttention {
    SessionAttention::try_from(v.attention).expect("known attention")
}

fn last_status(v: &proto::SessionView) -> RunStatus {
    RunStatus::try_from(v.last_run_status).expect("known status")
}

fn session(v: &proto::SessionView) -> &proto::Session {
    v.session.as_ref().expect("session")
}

/// `sessions.active_run_id`, read from the database.
async fn active_run_in_db(app: &TestApp, session_id: &str) -> Option<String> {
    let id = Uuid::parse_str(session_id).unwrap();
    app.db()
        .await
        .query_one("SELECT active_run_id FROM sessions WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get::<_, Option<Uuid>>(0)
        .map(|u| u.to_string())
}

#[tokio::test]
async fn attention_follows_runs_and_each_reader() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;
    let runner = runner("r1");
    let s1 = Uuid::new_v4().to_string();
    let s2 = Uuid::new_v4().to_string();

    let a1 = create_in(&mut app, Some(&s1), "first").await;
    let v = get(&mut sessions, &s1, "").await;
    assert_eq!(session(&v).version, 2, "created at 1, bumped by the run");
    assert_eq!(session(&v).last_run_id, a1);
    assert_eq!(session(&v).backend_profile, "scripted");
    assert_eq!(session(&v).project_id, "default");
    assert_eq!(attention(&v), SessionAttention::Active, "a pending run");
    assert_eq!(last_status(&v), RunStatus::Pending);
    assert_eq!(active_run_in_db(&app, &s1).await.as_deref(), Some(&*a1));

    // The first run holds S1 while it runs; S2's run and a run without session exist too.
    let held = claim_one(&mut app, &runner, &a1).await;
    let b = create_in(&mut app, Some(&s2), "other session").await;
    let lone = create_in(&mut app, None, "no session").await;
    let v = get(&mut sessions, &s1, "alice").await;
    assert_eq!(attention(&v), SessionAttention::Active, "a claimed run");
    assert_eq!(last_status(&v), RunStatus::Claimed);
    assert_eq!(session(&v).version, 2, "claiming is not a session change");
    app.runners
        .append_events(append(&runner, &held, deltas(1, 3)))
        .await
        .unwrap();
    end(&mut app, &runner, &held, RunStatus::Completed).await;

    let v = get(&mut sessions, &s1, "alice").await;
    assert_eq!(session(&v).version, 3, "the run ended");
    assert_eq!(attention(&v), SessionAttention::Unread);
    assert_eq!(last_status(&v), RunStatus::Completed);
    assert_eq!(active_run_in_db(&app, &s1).await, None);
    // S2 is untouched by S1's changes and the lone run belongs to no session.
    let v2 = get(&mut sessions, &s2, "alice").await;
    assert_eq!((session(&v2).version, &*session(&v2).last_run_id), (2, &*b));
    assert_eq!(attention(&v2), SessionAttention::Active);
    let lone_run = get_run(&mut app, &lone).await;
    assert!(lone_run.session_id.is_empty());

    // alice reads S1; bob has not.
    let v = mark_read(&mut sessions, &s1, "alice", 0).await;
    assert_eq!(attention(&v), SessionAttention::Read);
    assert_eq!(session(&v).version, 3, "reading is not a session change");
    assert_eq!(
        attention(&get(&mut sessions, &s1, "alice").await),
        SessionAttention::Read
    );
    assert_eq!(
        attention(&get(&mut sessions, &s1, "bob").await),
        SessionAttention::Unread
    );
    assert_eq!(
        attention(&get(&mut sessions, &s1, "").await),
        SessionAttention::Unread,
        "the default reader is a reader of its own"
    );

    // A second run in S1: active again, then unread again for alice once it ends.
    let b_assignment = claim_one(&mut app, &runner, &b).await;
    end(&mut app, &runner, &b_assignment, RunStatus::Completed).await;
    let lone_assignment = claim_one(&mut app, &runner, &lone).await;
    end(&mut app, &runner, &lone_assignment, RunStatus::Completed).await;
    let a2 = create_in(&mut app, Some(&s1), "second").await;
    let v = get(&mut sessions, &s1, "alice").await;
    assert_eq!(session(&v).version, 4);
    assert_eq!(session(&v).last_run_id, a2);
    assert_eq!(attention(&v), SessionAttention::Active);
    assert_eq!(active_run_in_db(&app, &s1).await.as_deref(), Some(&*a2));
    let held = claim_one(&mut app, &runner, &a2).await;
    end(&mut app, &runner, &held, RunStatus::Failed).await;
    let v = get(&mut sessions, &s1, "alice").await;
    assert_eq!(session(&v).version, 5);
    assert_eq!(attention(&v), SessionAttention::Unread);
    assert_eq!(last_status(&v), RunStatus::Failed);
    assert_eq!(active_run_in_db(&app, &s1).await, None);

    // An older version leaves it unread; the current one reads it; a cursor never moves back.
    let v = mark_read(&mut sessions, &s1, "alice", 4).await;
    assert_eq!(attention(&v), SessionAttention::Unread);
    assert_eq!(
        attention(&mark_read(&mut sessions, &s1, "alice", 5).await),
        SessionAttention::Read
    );
    let v = mark_read(&mut sessions, &s1, "alice", 3).await;
    assert_eq!(attention(&v), SessionAttention::Read, "cursor moved back");
    let cursor: i64 = app
        .db()
        .await
        .query_one(
            "SELECT read_version FROM session_read_cursors WHERE session_id = $1 AND reader = 'alice'",
            &[&Uuid::parse_str(&s1).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursor, 5);
    assert_eq!(
        attention(&get(&mut sessions, &s1, "bob").await),
        SessionAttention::Unread
    );
}

#[tokio::test]
async fn overlapping_runs_keep_the_session_active_until_the_last_ends() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;
    let runner = runner("r1");
    let s = Uuid::new_v4().to_string();
    let first = create_in(&mut app, Some(&s), "one").await;
    let second = create_in(&mut app, Some(&s), "two").await;
    let held = claim(&mut app, &runner, 2).await;
    let (a_first, a_second) = if held[0].run.as_ref().unwrap().run_id == first {
        (&held[0], &held[1])
    } else {
        (&held[1], &held[0])
    };

    // The newer run ends first: the older one still holds the session.
    end(&mut app, &runner, a_second, RunStatus::Completed).await;
    let v = get(&mut sessions, &s, "").await;
    assert_eq!(attention(&v), SessionAttention::Active);
    assert_eq!(session(&v).last_run_id, second, "the newest run stays last");
    assert_eq!(active_run_in_db(&app, &s).await.as_deref(), Some(&*first));

    end(&mut app, &runner, a_first, RunStatus::Completed).await;
    let v = get(&mut sessions, &s, "").await;
    assert_eq!(attention(&v), SessionAttention::Unread);
    assert_eq!(session(&v).last_run_id, second);
    assert_eq!(session(&v).version, 5, "two creations and two endings");
    assert_eq!(active_run_in_db(&app, &s).await, None);
}

/// Lists every session for `reader` with `state`, following page tokens with `page_size`.
async fn list_all(
    sessions: &mut Sessions,
    state: SessionStateFilter,
    reader: &str,
    page_size: i32,
) -> Vec<proto::SessionView> {
    let mut all = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = sessions
            .list_sessions(proto::ListSessionsRequest {
                state: state as i32,
                reader: reader.into(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list sessions")
            .into_inner();
        assert!(page.sessions.len() <= page_size as usize);
        all.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
    panic!("paging did not end");
}

fn ids(views: &[proto::SessionView]) -> Vec<String> {
    views
        .iter()
        .map(|v| session(v).session_id.clone())
        .collect()
}

fn id_set(views: &[proto::SessionView]) -> HashSet<String> {
    ids(views).into_iter().collect()
}

fn micros(v: &proto::SessionView) -> i64 {
    let t = session(v).updated_at.as_ref().expect("updated_at");
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

#[tokio::test]
async fn list_sessions_filters_orders_and_pages() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;
    let runner = runner("r1");
    let [unread, read, old_read, active, other] =
        std::array::from_fn(|_| Uuid::new_v4().to_string());

    // Three sessions whose runs end; alice reads two of them, and one of those ended
    // more than a week ago.
    for s in [&unread, &read, &old_read] {
        let run = create_in(&mut app, Some(s), "work").await;
        let held = claim_one(&mut app, &runner, &run).await;
        end(&mut app, &runner, &held, RunStatus::Completed).await;
    }
    for s in [&read, &old_read] {
        mark_read(&mut sessions, s, "alice", 0).await;
    }
    app.db()
        .await
        .execute(
            "UPDATE runs SET finished_at = now() - interval '8 days' WHERE session_id = $1",
            &[&Uuid::parse_str(&old_read).unwrap()],
        )
        .await
        .unwrap();
    // Two active sessions: a pending run, and one in another project and profile.
    create_in(&mut app, Some(&active), "waiting").await;
    let mut request = run_request("elsewhere");
    request.session_id = other.clone();
    request.project_id = "p2".into();
    request.backend_profile = "other-profile".into();
    app.runs.create_run(request).await.unwrap();

    // ALL: active (newest first), then unread, then read (newest first: reading is not
    // a change, so old_read, whose run ended last, is the most recent).
    let all = list_all(&mut sessions, SessionStateFilter::All, "alice", 200).await;
    assert_eq!(
        ids(&all),
        [&other, &active, &unread, &old_read, &read].map(String::clone)
    );
    let attentions: Vec<_> = all.iter().map(attention).collect();
    assert_eq!(
        attentions,
        [
            SessionAttention::Active,
            SessionAttention::Active,
            SessionAttention::Unread,
            SessionAttention::Read,
            SessionAttention::Read
        ]
    );
    for pair in all.windows(2) {
        if pair[0].attention == pair[1].attention {
            assert!(micros(&pair[0]) >= micros(&pair[1]), "most recent first");
        }
    }

    // Each filter, for alice.
    let expect = |state, want: &[&String]| {
        let mut sessions = sessions.clone();
        let want: HashSet<String> = want.iter().map(|s| s.to_string()).collect();
        async move {
            let got = list_all(&mut sessions, state, "alice", 200).await;
            assert_eq!(id_set(&got), want, "{state:?}");
            assert_eq!(got.len(), want.len(), "{state:?}: no duplicates");
        }
    };
    expect(SessionStateFilter::Running, &[&active, &other]).await;
    expect(SessionStateFilter::Unread, &[&unread]).await;
    expect(SessionStateFilter::Idle, &[&read, &old_read]).await;
    expect(SessionStateFilter::Terminal, &[&unread, &read, &old_read]).await;
    expect(
        SessionStateFilter::Default,
        &[&other, &active, &unread, &read],
    )
    .await;
    let default = list_all(&mut sessions, SessionStateFilter::Default, "alice", 200).await;
    assert_eq!(
        ids(&default),
        [&other, &active, &unread, &read].map(String::clone)
    );

    // bob has read nothing: the old session is unread to him, so it shows by default.
    let bob = list_all(&mut sessions, SessionStateFilter::Default, "bob", 200).await;
    assert_eq!(bob.len(), 5);
    let bob_unread = list_all(&mut sessions, SessionStateFilter::Unread, "bob", 200).await;
    assert_eq!(id_set(&bob_unread), id_set(&all[2..]));

    // Project and profile filters.
    for request in [
        proto::ListSessionsRequest {
            state: SessionStateFilter::All as i32,
            project_id: "p2".into(),
            ..Default::default()
        },
        proto::ListSessionsRequest {
            state: SessionStateFilter::All as i32,
            backend_profile: "other-profile".into(),
            ..Default::default()
        },
    ] {
        let got = sessions.list_sessions(request).await.unwrap().into_inner();
        assert_eq!(ids(&got.sessions), std::slice::from_ref(&other));
        assert!(got.next_page_token.is_empty());
    }

    // Pages of one walk the same order, every session exactly once.
    let paged = list_all(&mut sessions, SessionStateFilter::All, "alice", 1).await;
    assert_eq!(ids(&paged), ids(&all));
    let paged = list_all(&mut sessions, SessionStateFilter::All, "bob", 2).await;
    assert_eq!(
        ids(&paged),
        ids(&list_all(&mut sessions, SessionStateFilter::All, "bob", 200).await)
    );
    assert_eq!(paged.len(), 5);
}

/// A runner event with a JSON payload.
fn event(runner_seq: i64, event_type: &str, payload: serde_json::Value) -> proto::RunnerEvent {
    proto::RunnerEvent {
        runner_seq,
        r#type: event_type.into(),
        payload_json: payload.to_string(),
    }
}

/// All events of a session, following the (run, seq) cursor in pages of `limit`.
async fn session_events(
    sessions: &mut Sessions,
    session_id: &str,
    output_only: bool,
    limit: i32,
) -> Vec<proto::Event> {
    let mut all: Vec<proto::Event> = Vec::new();
    for _ in 0..1000 {
        let page = sessions
            .list_session_events(proto::ListSessionEventsRequest {
                session_id: session_id.into(),
                output_only,
                after_run_id: all.last().map(|e| e.run_id.clone()).unwrap_or_default(),
                after_seq: all.last().map_or(0, |e| e.seq),
                limit,
            })
            .await
            .expect("list session events")
            .into_inner();
        if page.events.is_empty() {
            return all;
        }
        assert!(page.events.len() <= limit as usize);
        all.extend(page.events);
    }
    panic!("paging did not end");
}

fn keys(events: &[proto::Event]) -> Vec<(String, i64, String)> {
    events
        .iter()
        .map(|e| (e.run_id.clone(), e.seq, e.r#type.clone()))
        .collect()
}

#[tokio::test]
async fn session_events_trace_output_only_and_resume() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;
    let runner = runner("r1");
    let s = Uuid::new_v4().to_string();

    let first = create_in(&mut app, Some(&s), "one").await;
    let held = claim_one(&mut app, &runner, &first).await;
    let mixed = vec![
        event(1, "turn.started", json!({"turn_id": "t1"})),
        event(
            2,
            "content.delta",
            json!({"kind": "reasoning_text", "delta": "hmm"}),
        ),
        event(
            3,
            "content.delta",
            json!({"kind": "assistant_text", "delta": "hi"}),
        ),
        event(
            4,
            "item.completed",
            json!({"item_id": "i1", "kind": "tool_call"}),
        ),
        event(
            5,
            "content.delta",
            json!({"kind": "command_output", "delta": "ls"}),
        ),
        event(
            6,
            "item.completed",
            json!({"item_id": "i2", "kind": "assistant_message"}),
        ),
        event(7, "diff.updated", json!({"diff": "+x"})),
        event(8, "runtime.warning", json!({"message": "slow"})),
        event(9, "runtime.error", json!({"message": "boom"})),
        event(10, "usage.updated", json!({"tokens": 3})),
        event(11, "turn.completed", json!({"state": "completed"})),
    ];
    app.runners
        .append_events(append(&runner, &held, mixed))
        .await
        .unwrap();
    end(&mut app, &runner, &held, RunStatus::Completed).await;
    let second = create_in(&mut app, Some(&s), "two").await;
    let held = claim_one(&mut app, &runner, &second).await;
    app.runners
        .append_events(append(&runner, &held, deltas(1, 4)))
        .await
        .unwrap();
    end(&mut app, &runner, &held, RunStatus::Failed).await;
    // A run elsewhere must not leak into the session's log.
    create_in(&mut app, None, "unrelated").await;

    // The full trace: both runs' logs, first run first, each in seq order.
    let mut expected = events_of(&mut app, &first).await;
    expected.extend(events_of(&mut app, &second).await);
    assert!(first < second, "run ids are time-ordered");
    let trace = session_events(&mut sessions, &s, false, 1000).await;
    assert_eq!(keys(&trace), keys(&expected));
    assert_eq!(trace.len(), expected.len());
    assert!(trace.iter().any(|e| e.r#type == "run.created"));

    // Output only: exactly the listed kinds, in the same order.
    let is_output = |e: &proto::Event| {
        let payload: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap();
        let kind = payload["kind"].as_str().unwrap_or_default();
        match e.r#type.as_str() {
            "content.delta" => kind == "assistant_text" || kind == "command_output",
            "item.completed" => kind == "assistant_message",
            t => ["diff.updated", "runtime.error", "run.terminal"].contains(&t),
        }
    };
    let output = session_events(&mut sessions, &s, true, 1000).await;
    let want: Vec<proto::Event> = expected.iter().filter(|e| is_output(e)).cloned().collect();
    assert_eq!(keys(&output), keys(&want));
    let types: Vec<&str> = output
        .iter()
        .filter(|e| e.run_id == first)
        .map(|e| e.r#type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "content.delta",
            "content.delta",
            "item.completed",
            "diff.updated",
            "runtime.error",
            "run.terminal"
        ]
    );
    // Second run: four assistant deltas and its end.
    assert_eq!(output.iter().filter(|e| e.run_id == second).count(), 5);

    // Small pages give the same sequence, with or without the filter.
    assert_eq!(
        keys(&session_events(&mut sessions, &s, false, 3).await),
        keys(&trace)
    );
    assert_eq!(
        keys(&session_events(&mut sessions, &s, true, 2).await),
        keys(&output)
    );

    // Resuming from a cursor gives exactly the rest.
    for cut in [1, 5, trace.len() / 2, trace.len() - 1] {
        let rest = sessions
            .list_session_events(proto::ListSessionEventsRequest {
                session_id: s.clone(),
                after_run_id: trace[cut - 1].run_id.clone(),
                after_seq: trace[cut - 1].seq,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        assert_eq!(keys(&rest), keys(&trace[cut..]), "resume after {cut}");
    }
    // The end of the first run resumes at the start of the second.
    let last_of_first = trace.iter().rfind(|e| e.run_id == first).unwrap();
    let rest = sessions
        .list_session_events(proto::ListSessionEventsRequest {
            session_id: s.clone(),
            after_run_id: first.clone(),
            after_seq: last_of_first.seq,
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(keys(&rest), keys(&events_of(&mut app, &second).await[..2]));
}

#[tokio::test]
async fn sessions_are_invisible_to_other_tenants() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;
    let s = Uuid::new_v4().to_string();
    let mut request = run_request("mine");
    request.session_id = s.clone();
    app.runs
        .create_run(as_tenant("acme", request))
        .await
        .unwrap();
    let view = sessions
        .get_session(as_tenant(
            "acme",
            proto::GetSessionRequest {
                session_id: s.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session(view.session.as_ref().unwrap()).session_id, s);

    for tenant in ["intruder", "default"] {
        let err = sessions
            .get_session(as_tenant(
                tenant,
                proto::GetSessionRequest {
                    session_id: s.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{tenant}: {err:?}");
        let err = sessions
            .mark_session_read(as_tenant(
                tenant,
                proto::MarkSessionReadRequest {
                    session_id: s.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{tenant}: {err:?}");
        let err = sessions
            .list_session_events(as_tenant(
                tenant,
                proto::ListSessionEventsRequest {
                    session_id: s.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{tenant}: {err:?}");
        let listed = sessions
            .list_sessions(as_tenant(
                tenant,
                proto::ListSessionsRequest {
                    state: SessionStateFilter::All as i32,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.sessions.is_empty(), "{tenant} sees acme's session");
    }
    // An unknown session of one's own tenant is NOT_FOUND the same way.
    let err = sessions
        .list_session_events(proto::ListSessionEventsRequest {
            session_id: Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let cursors: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM session_read_cursors", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        cursors, 0,
        "another tenant's MarkSessionRead wrote a cursor"
    );
    let listed = sessions
        .list_sessions(as_tenant(
            "acme",
            proto::ListSessionsRequest {
                state: SessionStateFilter::All as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&listed.sessions), std::slice::from_ref(&s));
}

#[tokio::test]
async fn bad_input_names_the_field_and_changes_nothing() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;
    let s = Uuid::new_v4().to_string();
    create_in(&mut app, Some(&s), "hello").await;
    let before = get(&mut sessions, &s, "alice").await;
    assert_eq!(session(&before).version, 2);

    fn invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} not named in {:?}",
            err.message()
        );
    }

    for bad in ["", "not-a-uuid"] {
        invalid(
            sessions
                .get_session(proto::GetSessionRequest {
                    session_id: bad.into(),
                    ..Default::default()
                })
                .await,
            "session_id",
        );
        invalid(
            sessions
                .mark_session_read(proto::MarkSessionReadRequest {
                    session_id: bad.into(),
                    ..Default::default()
                })
                .await,
            "session_id",
        );
        invalid(
            sessions
                .list_session_events(proto::ListSessionEventsRequest {
                    session_id: bad.into(),
                    ..Default::default()
                })
                .await,
            "session_id",
        );
    }
    invalid(
        sessions
            .get_session(proto::GetSessionRequest {
                session_id: s.clone(),
                reader: "two words".into(),
            })
            .await,
        "reader",
    );
    for token in ["garbage", "0011", &"ab".repeat(200)] {
        invalid(
            sessions
                .list_sessions(proto::ListSessionsRequest {
                    page_token: token.into(),
                    ..Default::default()
                })
                .await,
            "page_token",
        );
    }
    invalid(
        sessions
            .list_sessions(proto::ListSessionsRequest {
                page_size: 201,
                ..Default::default()
            })
            .await,
        "page_size",
    );
    invalid(
        sessions
            .list_sessions(proto::ListSessionsRequest {
                state: 99,
                ..Default::default()
            })
            .await,
        "state",
    );
    invalid(
        sessions
            .list_session_events(proto::ListSessionEventsRequest {
                session_id: s.clone(),
                after_run_id: "nope".into(),
                ..Default::default()
            })
            .await,
        "after_run_id",
    );
    invalid(
        sessions
            .list_session_events(proto::ListSessionEventsRequest {
                session_id: s.clone(),
                after_seq: 3,
                ..Default::default()
            })
            .await,
        "after_seq",
    );
    invalid(
        sessions
            .list_session_events(proto::ListSessionEventsRequest {
                session_id: s.clone(),
                limit: 1001,
                ..Default::default()
            })
            .await,
        "limit",
    );
    for version in [3, -1] {
        invalid(
            sessions
                .mark_session_read(proto::MarkSessionReadRequest {
                    session_id: s.clone(),
                    reader: "alice".into(),
                    version,
                })
                .await,
            "version",
        );
    }

    // Nothing changed: no cursor written, the session as it was.
    let cursors: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM session_read_cursors", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cursors, 0);
    let after = get(&mut sessions, &s, "alice").await;
    assert_eq!(after, before);
    // The version it does have is accepted.
    let v = mark_read(&mut sessions, &s, "alice", 2).await;
    assert_eq!(session(&v).version, 2);
}
