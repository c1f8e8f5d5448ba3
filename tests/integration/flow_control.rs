//! Flow control: concurrency keys and rate limits, against real manager and runner
//! processes where the claim is what is proved (two replicas), and in process where
//! the answer is (waiting reasons, statistics, bad input).
//!
//! Claim and end times are read from the log (`run.claimed`, `run.terminal`), the way
//! an auditor would.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use agentrun_manager::config::AuthMode;
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{self, RateLimitScope};
use agentrun_tests::*;
use tonic::Code;

const LONG: Duration = Duration::from_secs(60);

/// The safety-net poll, set far out so that only wake-ups (NOTIFY, timers) can be what
/// moves the runs these tests wait for.
const NO_POLL: (&str, &str) = ("AGENTRUN_RUNNER_POLL_INTERVAL_MS", "600000");

fn keyed(prompt: &str, key: &str) -> proto::CreateRunRequest {
    proto::CreateRunRequest {
        concurrency_key: key.into(),
        ..run_request(prompt)
    }
}

async fn create_keyed(
    runs: &mut RunServiceClient<tonic::transport::Channel>,
    key: &str,
    i: usize,
) -> String {
    runs.create_run(keyed(&format!("[tokens:8] {key} {i}"), key))
        .await
        .expect("create a keyed run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

/// Per run: when it was created, claimed (each claim) and ended, from the log.
#[derive(Debug, Default, Clone)]
struct Timeline {
    created: Option<SystemTime>,
    claims: Vec<SystemTime>,
    ended: Option<SystemTime>,
}

async fn timelines(db: &tokio_postgres::Client) -> HashMap<String, Timeline> {
    let rows = db
        .query(
            "SELECT e.run_id::text, e.type, e.created_at FROM events e
             WHERE e.type IN ('run.created', 'run.claimed', 'run.terminal')
             ORDER BY e.run_id, e.seq",
            &[],
        )
        .await
        .expect("read the log");
    let mut all: HashMap<String, Timeline> = HashMap::new();
    for row in rows {
        let t = all.entry(row.get(0)).or_default();
        let at: SystemTime = row.get(2);
        match row.get::<_, &str>(1) {
            "run.created" => t.created = Some(at),
            "run.claimed" => t.claims.push(at),
            _ => t.ended = Some(at),
        }
    }
    all
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect("count").get(0)
}

async fn wait_all_completed(db: &tokio_postgres::Client, n: i64) {
    wait_for("every run to complete", LONG, || async {
        let done = count(db, "SELECT count(*) FROM runs WHERE status = 'completed'").await;
        let other = count(
            db,
            "SELECT count(*) FROM runs WHERE status IN ('failed', 'cancelled', 'expired', 'blocked')",
        )
        .await;
        assert_eq!(other, 0, "a run ended otherwise than completed");
        (done == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_key_with_limit_one_never_has_two_runs_active_across_two_replicas() {
    let url = fresh_database().await;
    let (a, b) = tokio::join!(
        ManagerProcess::start(&url, &[NO_POLL]),
        ManagerProcess::start(&url, &[NO_POLL])
    );
    let _runners = [
        RunnerProcess::start(a.addr, "a1", &[]),
        RunnerProcess::start(a.addr, "a2", &[]),
        RunnerProcess::start(b.addr, "b1", &[]),
        RunnerProcess::start(b.addr, "b2", &[]),
    ];
    let mut runs_a = RunServiceClient::new(a.channel().await);
    let mut runs_b = RunServiceClient::new(b.channel().await);
    // One key's runs through both replicas, in a known order, then another key's.
    let mut user1 = Vec::new();
    for i in 0..12 {
        let runs = if i % 2 == 0 { &mut runs_a } else { &mut runs_b };
        user1.push(create_keyed(runs, "user-1", i).await);
    }
    let mut user2 = Vec::new();
    for i in 0..4 {
        let runs = if i % 2 == 0 { &mut runs_b } else { &mut runs_a };
        user2.push(create_keyed(runs, "user-2", i).await);
    }
    let db = db_client(&url).await;
    wait_all_completed(&db, 16).await;

    let log = timelines(&db).await;
    let line = |id: &String| log[id].clone();
    // Claimed in the order created, and each claimed only after the one before ended.
    let mut previous_end: Option<SystemTime> = None;
    for id in &user1 {
        let t = line(id);
        assert_eq!(t.claims.len(), 1, "run {id} claimed once");
        if let Some(end) = previous_end {
            assert!(
                t.claims[0] >= end,
                "a user-1 run was claimed while the one before it was active: {:?} before",
                end.duration_since(t.claims[0])
            );
        }
        previous_end = Some(t.ended.expect("ended"));
    }
    // The other key is not held up behind the first: its first run starts long before
    // user-1's queue is through.
    let user2_first = line(&user2[0]).claims[0];
    let user1_late = line(&user1[6]).claims[0];
    assert!(
        user2_first < user1_late,
        "user-2 waited behind user-1's runs"
    );
    // Same for user-2, which also has the default limit of 1.
    let mut spans: Vec<(SystemTime, SystemTime)> = user2
        .iter()
        .map(|id| (line(id).claims[0], line(id).ended.unwrap()))
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two user-2 runs were active at once"
        );
    }
    assert_event_log_consistent(&db).await;
}

#[tokio::test]
async fn raising_a_key_limit_lets_waiting_runs_go_at_once() {
    let url = fresh_database().await;
    let manager = ManagerProcess::start(&url, &[NO_POLL]).await;
    let mut runs = RunServiceClient::new(manager.channel().await);
    let mut admin = AdminServiceClient::new(manager.channel().await);
    let _runner = RunnerProcess::start(manager.addr, "r", &[("AGENTRUN_MAX_CONCURRENCY", "8")]);
    let db = db_client(&url).await;
    let active = "SELECT count(*) FROM runs WHERE concurrency_key = 'k'
                  AND status IN ('claimed', 'running', 'waiting')";
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..4 {
            let id = runs
                .create_run(keyed(&format!("[stall] {i}"), "k"))
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap()
                .run_id;
            ids.push(id);
        }
        ids
    };
    wait_for("one run of the key active", LONG, || async {
        (count(&db, active).await == 1).then_some(())
    })
    .await;
    admin
        .set_concurrency_limit(proto::SetConcurrencyLimitRequest {
            tenant_id: "default".into(),
            concurrency_key: "k".into(),
            max_active: 2,
        })
        .await
        .expect("set the key's limit");
    wait_for(
        "two runs of the key active",
        Duration::from_secs(5),
        || async { (count(&db, active).await == 2).then_some(()) },
    )
    .await;
    // Never more than the limit, however long we look.
    let listed = admin
        .list_concurrency_limits(proto::ListConcurrencyLimitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .concurrency_limits;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].max_active,
            listed[0].active_runs,
            listed[0].waiting_runs
        ),
        (2, 2, 2)
    );
    // The tenant default covers keys without their own limit; removing the key's own
    // falls back to it.
    admin
        .set_concurrency_limit(proto::SetConcurrencyLimitRequest {
            tenant_id: "default".into(),
            concurrency_key: String::new(),
            max_active: 4,
        })
        .await
        .unwrap();
    admin
        .set_concurrency_limit(proto::SetConcurrencyLimitRequest {
            tenant_id: "default".into(),
            concurrency_key: "k".into(),
            max_active: 0,
        })
        .await
        .unwrap();
    wait_for(
        "four runs of the key active",
        Duration::from_secs(5),
        || async { (count(&db, active).await == 4).then_some(()) },
    )
    .await;
    for id in ids {
        runs.cancel_run(proto::CancelRunRequest {
            run_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_rate_limit_holds_claims_to_its_rate_across_two_replicas() {
    let url = fresh_database().await;
    let (a, b) = tokio::join!(
        ManagerProcess::start(&url, &[NO_POLL]),
        ManagerProcess::start(&url, &[NO_POLL])
    );
    let mut admin = AdminServiceClient::new(a.channel().await);
    admin
        .set_rate_limit(proto::SetRateLimitRequest {
            rate_limit: Some(proto::RateLimit {
                tenant_id: "default".into(),
                scope: RateLimitScope::Tenant as i32,
                runs: 10,
                period_ms: 1000,
                burst: 10,
                ..Default::default()
            }),
        })
        .await
        .expect("set the rate limit");
    let eight = [("AGENTRUN_MAX_CONCURRENCY", "8")];
    let _runners = [
        RunnerProcess::start(a.addr, "a1", &eight),
        RunnerProcess::start(a.addr, "a2", &eight),
        RunnerProcess::start(b.addr, "b1", &eight),
        RunnerProcess::start(b.addr, "b2", &eight),
    ];
    let total = 60;
    let mut runs_a = RunServiceClient::new(a.channel().await);
    let mut runs_b = RunServiceClient::new(b.channel().await);
    let half = |from: usize| proto::CreateRunsRequest {
        runs: (from..from + total / 2)
            .map(|i| run_request(&format!("[tokens:1] {i}")))
            .collect(),
    };
    runs_a.create_runs(half(0)).await.unwrap();
    runs_b.create_runs(half(total / 2)).await.unwrap();
    let db = db_client(&url).await;
    // Every run is claimed (throughput is not zero): 10 at once, then 10 a second.
    wait_all_completed(&db, total as i64).await;

    let mut claims: Vec<SystemTime> = timelines(&db)
        .await
        .into_values()
        .flat_map(|t| t.claims)
        .collect();
    claims.sort();
    assert_eq!(claims.len(), total);
    let window = Duration::from_secs(1);
    let mut most = 0;
    for (i, start) in claims.iter().enumerate() {
        let within = claims[i..]
            .iter()
            .take_while(|at| at.duration_since(*start).unwrap() <= window)
            .count();
        most = most.max(within);
    }
    assert!(
        most <= 20,
        "a one-second window holds {most} claims, more than the limit plus its burst (20)"
    );
    // And it did limit: 60 runs at 10/s after a burst of 10 take about 5 s.
    let span = claims.last().unwrap().duration_since(claims[0]).unwrap();
    assert!(
        span >= Duration::from_millis(4_000),
        "claims spanned only {span:?}"
    );
    let listed = admin
        .list_rate_limits(proto::ListRateLimitsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rate_limits;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].runs, listed[0].burst), (10, 10));
}

#[tokio::test]
async fn waiting_runs_say_why_in_get_run_and_queue_stats() {
    let mut app = TestApp::spawn().await;
    let set = app
        .admin
        .set_rate_limit(proto::SetRateLimitRequest {
            rate_limit: Some(proto::RateLimit {
                tenant_id: "default".into(),
                scope: RateLimitScope::Queue as i32,
                key: "slow".into(),
                runs: 1,
                period_ms: 3_600_000,
                burst: 0,
                ..Default::default()
            }),
        })
        .await
        .expect("set a queue rate limit")
        .into_inner()
        .rate_limit
        .unwrap();
    assert_eq!((set.burst, set.tokens), (1, 1.0));

    let in_slow = |prompt: &str| proto::CreateRunRequest {
        queue: "slow".into(),
        ..run_request(prompt)
    };
    let mut ids = Vec::new();
    for prompt in ["one", "two"] {
        ids.push(
            app.runs
                .create_run(in_slow(prompt))
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap()
                .run_id,
        );
    }
    let k1 = app
        .runs
        .create_run(keyed("k1", "key"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let k2 = app
        .runs
        .create_run(keyed("k2", "key"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(k1.waiting_reason, "");
    assert_eq!(k1.concurrency_key, "key");
    assert_eq!(k2.waiting_reason, "concurrency_key");
    let later = proto::CreateRunRequest {
        scheduled_at: Some((SystemTime::now() + Duration::from_secs(3600)).into()),
        ..run_request("later")
    };
    let later = app
        .runs
        .create_run(later)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();

    let mut worker = runner("w");
    worker.queues = vec!["slow".into(), "default".into()];
    let assignments = claim(&mut app, &worker, 2).await;
    let mut claimed: Vec<String> = assignments
        .iter()
        .map(|a| a.run.clone().unwrap().run_id)
        .collect();
    claimed.sort();
    let mut expected = vec![ids[0].clone(), k1.run_id.clone()];
    expected.sort();
    assert_eq!(
        claimed, expected,
        "the first slow run and the key's first run"
    );
    // Nothing more is claimable: the bucket is empty, the key is full, the third waits.
    let more = app
        .runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(worker.clone()),
            max_runs: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .assignments;
    assert!(more.is_empty(), "claimed past a limit: {more:?}");

    assert_eq!(
        get_run(&mut app, &ids[1]).await.waiting_reason,
        "rate_limit"
    );
    assert_eq!(
        get_run(&mut app, &k2.run_id).await.waiting_reason,
        "concurrency_key"
    );
    assert_eq!(
        get_run(&mut app, &later.run_id).await.waiting_reason,
        "scheduled"
    );
    assert_eq!(get_run(&mut app, &ids[0]).await.waiting_reason, "");

    let stats = app
        .admin
        .get_queue_stats(proto::GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let waiting: Vec<(String, String, String, i64)> = stats
        .waiting
        .iter()
        .map(|w| {
            (
                w.tenant_id.clone(),
                w.queue.clone(),
                w.reason.clone(),
                w.runs,
            )
        })
        .collect();
    assert_eq!(
        waiting,
        vec![
            (
                "default".into(),
                "default".into(),
                "concurrency_key".into(),
                1
            ),
            ("default".into(), "slow".into(), "rate_limit".into(), 1),
        ]
    );
    let limits = app
        .admin
        .list_rate_limits(proto::ListRateLimitsRequest {
            tenant_id: "default".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rate_limits;
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0].waiting_runs, 1);
    assert!(limits[0].tokens < 1.0);

    // Ending the key's run lets the next in; removing the rate limit frees the queue.
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: k1.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    app.admin
        .set_rate_limit(proto::SetRateLimitRequest {
            rate_limit: Some(proto::RateLimit {
                tenant_id: "default".into(),
                scope: RateLimitScope::Queue as i32,
                key: "slow".into(),
                runs: 0,
                ..Default::default()
            }),
        })
        .await
        .expect("remove the rate limit");
    assert_eq!(get_run(&mut app, &ids[1]).await.waiting_reason, "");
    // The cancelled run is still leased to the worker until it finishes it; the key
    // counts it until then.
    let k1_lease = assignments
        .iter()
        .find(|a| a.run.as_ref().unwrap().run_id == k1.run_id)
        .unwrap();
    app.runners
        .finish_run(finish(&worker, k1_lease, proto::RunStatus::Cancelled))
        .await
        .expect("finish the cancelled run");
    assert_eq!(get_run(&mut app, &k2.run_id).await.waiting_reason, "");
    let next = claim(&mut app, &worker, 2).await;
    let mut next: Vec<String> = next.into_iter().map(|a| a.run.unwrap().run_id).collect();
    next.sort();
    let mut expected = vec![ids[1].clone(), k2.run_id.clone()];
    expected.sort();
    assert_eq!(next, expected);
}

/// A tenant at its limit of active runs: its pending runs say so, and stop saying it
/// once one of its active runs ends.
#[tokio::test]
async fn a_tenant_at_its_active_run_limit_says_so_in_get_run() {
    let mut app = TestApp::spawn().await;
    app.admin
        .set_tenant_limit(proto::SetTenantLimitRequest {
            tenant_id: "default".into(),
            max_active_runs: 1,
        })
        .await
        .expect("set the tenant limit");
    let first = create(&mut app, "active").await;
    let second = create(&mut app, "waits").await;
    assert_eq!(get_run(&mut app, &second).await.waiting_reason, "");
    let worker = runner("w");
    let held = claim(&mut app, &worker, 1).await;
    assert_eq!(held[0].run.as_ref().unwrap().run_id, first);
    assert_eq!(get_run(&mut app, &first).await.waiting_reason, "");
    assert_eq!(
        get_run(&mut app, &second).await.waiting_reason,
        "tenant_limit"
    );
    app.runners
        .finish_run(finish(&worker, &held[0], proto::RunStatus::Completed))
        .await
        .expect("finish the active run");
    assert_eq!(get_run(&mut app, &second).await.waiting_reason, "");
}

#[tokio::test]
async fn bad_flow_control_input_is_refused_naming_the_field_and_changes_nothing() {
    let mut app = TestApp::spawn().await;
    let rate = |f: &dyn Fn(&mut proto::RateLimit)| {
        let mut limit = proto::RateLimit {
            tenant_id: "t".into(),
            scope: RateLimitScope::Queue as i32,
            key: "q".into(),
            runs: 10,
            period_ms: 1000,
            burst: 10,
            ..Default::default()
        };
        f(&mut limit);
        proto::SetRateLimitRequest {
            rate_limit: Some(limit),
        }
    };
    let long_key = "k".repeat(257);
    let cases: Vec<(proto::SetRateLimitRequest, &str)> = vec![
        (
            proto::SetRateLimitRequest { rate_limit: None },
            "rate_limit",
        ),
        (rate(&|l| l.tenant_id.clear()), "rate_limit.tenant_id"),
        (rate(&|l| l.scope = 0), "rate_limit.scope"),
        (rate(&|l| l.scope = 42), "rate_limit.scope"),
        (rate(&|l| l.key.clear()), "rate_limit.key"),
        (
            rate(&|l| {
                l.scope = RateLimitScope::Tenant as i32;
            }),
            "rate_limit.key",
        ),
        (
            rate(&|l| {
                l.scope = RateLimitScope::ConcurrencyKey as i32;
                l.key = long_key.clone();
            }),
            "rate_limit.key",
        ),
        (rate(&|l| l.runs = -1), "rate_limit.runs"),
        (rate(&|l| l.runs = 100_001), "rate_limit.runs"),
        (rate(&|l| l.period_ms = 999), "rate_limit.period_ms"),
        (rate(&|l| l.period_ms = 3_600_001), "rate_limit.period_ms"),
        (rate(&|l| l.burst = -5), "rate_limit.burst"),
        (rate(&|l| l.burst = 100_001), "rate_limit.burst"),
    ];
    for (request, field) in cases {
        let status = app
            .admin
            .set_rate_limit(request.clone())
            .await
            .expect_err(&format!("{request:?} is refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert!(
            status.message().contains(field),
            "{:?} names {field}",
            status.message()
        );
    }
    // Removing a limit that does not exist is fine and changes nothing.
    app.admin
        .set_rate_limit(rate(&|l| l.runs = 0))
        .await
        .expect("removing an absent limit");
    let listed = app
        .admin
        .list_rate_limits(proto::ListRateLimitsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.rate_limits.is_empty());

    let concurrency =
        |tenant: &str, key: &str, max_active: i32| proto::SetConcurrencyLimitRequest {
            tenant_id: tenant.into(),
            concurrency_key: key.into(),
            max_active,
        };
    for (request, field) in [
        (concurrency("", "k", 2), "tenant_id"),
        (concurrency("t", &long_key, 2), "concurrency_key"),
        (concurrency("t", "bad\nkey", 2), "concurrency_key"),
        (concurrency("t", "k", -1), "max_active"),
        (concurrency("t", "k", 10_001), "max_active"),
    ] {
        let status = app
            .admin
            .set_concurrency_limit(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert!(
            status.message().contains(field),
            "{:?} names {field}",
            status.message()
        );
    }
    let listed = app
        .admin
        .list_concurrency_limits(proto::ListConcurrencyLimitsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.concurrency_limits.is_empty());
    let status = app
        .admin
        .list_rate_limits(proto::ListRateLimitsRequest {
            tenant_id: "not a name".into(),
        })
        .await
        .expect_err("a bad tenant filter is refused");
    assert_eq!(status.code(), Code::InvalidArgument);

    // CreateRun: an oversized key is refused, and no run is made.
    let status = app
        .runs
        .create_run(keyed("x", &long_key))
        .await
        .expect_err("an oversized key is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("concurrency_key"),
        "{}",
        status.message()
    );
    let db = app.db().await;
    assert_eq!(count(&db, "SELECT count(*) FROM runs").await, 0);

    // The key is part of what an idempotency key compares.
    let first = proto::CreateRunRequest {
        idempotency_key: "once".into(),
        ..keyed("same", "a")
    };
    app.runs.create_run(first.clone()).await.expect("created");
    let retried = app.runs.create_run(first.clone()).await.expect("a retry");
    assert!(!retried.into_inner().created);
    let other = proto::CreateRunRequest {
        concurrency_key: "b".into(),
        ..first
    };
    let status = app
        .runs
        .create_run(other)
        .await
        .expect_err("a different key conflicts");
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn flow_control_admin_calls_need_the_admin_role() {
    let mut app = TestApp::spawn_with(|s| s.auth = AuthMode::Required).await;
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    let key = api_keys::create(&client, "t", Role::Client, &[], "test", None)
        .await
        .expect("create key")
        .key;
    let with_key = |message| {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ASCII key"),
        );
        request
    };
    let status = app
        .admin
        .set_concurrency_limit(with_key(proto::SetConcurrencyLimitRequest {
            tenant_id: "t".into(),
            concurrency_key: "k".into(),
            max_active: 3,
        }))
        .await
        .expect_err("a client key may not set limits");
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut with_key_rate = tonic::Request::new(proto::ListRateLimitsRequest::default());
    with_key_rate.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII key"),
    );
    let status = app
        .admin
        .list_rate_limits(with_key_rate)
        .await
        .expect_err("a client key may not list limits");
    assert_eq!(status.code(), Code::PermissionDenied);
}
