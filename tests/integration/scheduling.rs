//! Scheduling controls: fair claims across tenants, per-tenant limits on active runs,
//! delayed starts (`scheduled_at`), and the AdminService (queue and tenant statistics,
//! runners and their leases, draining a runner through another replica).

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use prost_types::Timestamp;
use tonic::Code;

const LONG: Duration = Duration::from_secs(30);

/// The prompt a run was created with.
fn prompt_of(a: &proto::Assignment) -> String {
    let input: serde_json::Value =
        serde_json::from_str(&a.run.as_ref().expect("assignment has a run").input_json)
            .expect("input is JSON");
    input["prompt"].as_str().unwrap_or_default().to_owned()
}

fn run_id_of(a: &proto::Assignment) -> String {
    a.run.as_ref().expect("assignment has a run").run_id.clone()
}

/// Runs of `tenant` named `<tenant> 0`, `<tenant> 1`, … created in one CreateRuns call.
async fn create_for(app: &mut TestApp, tenant: &str, n: usize) -> Vec<String> {
    let runs = (0..n)
        .map(|i| run_request(&format!("{tenant} {i}")))
        .collect();
    app.runs
        .create_runs(as_tenant(tenant, proto::CreateRunsRequest { runs }))
        .await
        .expect("create runs")
        .into_inner()
        .runs
        .into_iter()
        .map(|c| c.run.expect("run").run_id)
        .collect()
}

async fn claim_batch(
    app: &mut TestApp,
    runner: &proto::RunnerIdentity,
    max_runs: i32,
) -> Vec<proto::Assignment> {
    app.runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(runner.clone()),
            max_runs,
        })
        .await
        .expect("claim runs")
        .into_inner()
        .assignments
}

/// How many of the assignments belong to `tenant` (prompts start with its name).
fn count_of(assignments: &[proto::Assignment], tenant: &str) -> usize {
    let prefix = format!("{tenant} ");
    assignments
        .iter()
        .filter(|a| prompt_of(a).starts_with(&prefix))
        .count()
}

async fn set_limit(app: &mut TestApp, tenant: &str, max_active_runs: i32) {
    app.admin
        .set_tenant_limit(proto::SetTenantLimitRequest {
            tenant_id: tenant.into(),
            max_active_runs,
        })
        .await
        .expect("set tenant limit");
}

async fn tenant_stats(app: &mut TestApp, tenant: &str) -> Option<proto::TenantStats> {
    app.admin
        .get_queue_stats(proto::GetQueueStatsRequest {})
        .await
        .expect("queue stats")
        .into_inner()
        .tenants
        .into_iter()
        .find(|t| t.tenant_id == tenant)
}

fn timestamp_in(delay: Duration) -> Timestamp {
    Timestamp::from(SystemTime::now() + delay)
}

fn system_time(t: &Option<Timestamp>) -> SystemTime {
    SystemTime::try_from(t.expect("timestamp is set")).expect("valid timestamp")
}

#[tokio::test]
async fn a_tenants_backlog_does_not_delay_another_tenants_first_run() {
    let mut app = TestApp::spawn().await;
    create_for(&mut app, "a", 1000).await;
    let b_run = create_for(&mut app, "b", 1).await.remove(0);

    let me = runner("fair");
    let mut found_in = None;
    for batch in 0..=100 {
        let got = claim_batch(&mut app, &me, 10).await;
        assert!(!got.is_empty(), "ran out of runs before b's was claimed");
        if got.iter().any(|a| run_id_of(a) == b_run) {
            found_in = Some((batch, got));
            break;
        }
    }
    let (batch, got) = found_in.expect("b's run was claimed");
    assert_eq!(batch, 0, "b's run waited behind a's backlog");
    assert_eq!(got.len(), 10);
    assert_eq!(count_of(&got, "a"), 9, "the rest of the batch is a's");

    // With a's runs now active, b's next run goes first even in a batch of one.
    let b_next = create_for(&mut app, "b", 1).await.remove(0);
    let got = claim_batch(&mut app, &me, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        run_id_of(&got[0]),
        b_next,
        "the least loaded tenant goes first"
    );
}

#[tokio::test]
async fn priority_labels_and_profile_still_hold_within_fair_claims() {
    let mut app = TestApp::spawn().await;
    let requests = [
        ("a low", 0, vec![], "scripted"),
        ("a high", 5, vec![], "scripted"),
        ("a gpu", 9, vec!["gpu".to_owned()], "scripted"),
        ("a other", 9, vec![], "other-profile"),
    ];
    for (prompt, priority, labels, profile) in requests {
        let mut request = run_request(prompt);
        request.priority = priority;
        request.labels = labels;
        request.backend_profile = profile.into();
        app.runs
            .create_run(as_tenant("a", request))
            .await
            .expect("create run");
    }
    let mut request = run_request("b only");
    request.priority = -5;
    app.runs
        .create_run(as_tenant("b", request))
        .await
        .expect("create run");

    // Two at a time: a's best and b's best first (priority is per tenant, so b's low
    // priority does not put it behind a's other runs), then a's next.
    let plain = runner("plain");
    let first = claim_batch(&mut app, &plain, 2).await;
    let prompts: HashSet<String> = first.iter().map(prompt_of).collect();
    assert_eq!(
        prompts,
        HashSet::from(["a high".to_owned(), "b only".to_owned()])
    );
    let second = claim_batch(&mut app, &plain, 10).await;
    let prompts: Vec<String> = second.iter().map(prompt_of).collect();
    assert_eq!(
        prompts,
        vec!["a low"],
        "labels and profile keep the rest away"
    );

    let mut gpu = runner("gpu");
    gpu.labels = vec!["gpu".into(), "linux".into()];
    gpu.backend_profiles = vec!["scripted".into(), "other-profile".into()];
    let third = claim_batch(&mut app, &gpu, 10).await;
    let prompts: Vec<String> = third.iter().map(prompt_of).collect();
    assert_eq!(prompts.len(), 2, "{prompts:?}");
    assert!(prompts.contains(&"a gpu".to_owned()) && prompts.contains(&"a other".to_owned()));
}

#[tokio::test]
async fn a_tenant_limit_caps_active_runs_without_holding_back_others() {
    let mut app = TestApp::spawn().await;
    set_limit(&mut app, "a", 2).await;
    create_for(&mut app, "a", 5).await;
    create_for(&mut app, "b", 3).await;

    let me = runner("limited");
    let got = claim_batch(&mut app, &me, 20).await;
    assert_eq!(count_of(&got, "a"), 2, "a is held to its limit");
    assert_eq!(count_of(&got, "b"), 3, "b is not held back");
    assert!(
        claim_batch(&mut app, &me, 20).await.is_empty(),
        "a is at its limit"
    );

    let stats = tenant_stats(&mut app, "a").await.expect("a has stats");
    assert_eq!(
        (stats.pending_runs, stats.active_runs, stats.max_active_runs),
        (3, 2, 2)
    );
    let stats = tenant_stats(&mut app, "b").await.expect("b has stats");
    assert_eq!(
        (stats.pending_runs, stats.active_runs, stats.max_active_runs),
        (0, 3, 0)
    );

    // Finishing one of a's runs makes room for exactly one more.
    let a_run = got
        .iter()
        .find(|a| prompt_of(a).starts_with("a "))
        .expect("a run of a");
    app.runners
        .finish_run(finish(&me, a_run, RunStatus::Completed))
        .await
        .expect("finish");
    let more = claim_batch(&mut app, &me, 20).await;
    assert_eq!(more.len(), 1);
    assert_eq!(count_of(&more, "a"), 1);
    assert!(claim_batch(&mut app, &me, 20).await.is_empty());

    // Removing the limit (0) frees the rest.
    set_limit(&mut app, "a", 0).await;
    assert_eq!(claim_batch(&mut app, &me, 20).await.len(), 2);
    let stats = tenant_stats(&mut app, "a").await.expect("a has stats");
    assert_eq!((stats.active_runs, stats.max_active_runs), (4, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_push_a_tenant_past_its_limit() {
    // Nothing heartbeats here: leases must outlast a slow machine.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    const TENANTS: usize = 10;
    const LIMIT: i64 = 5;
    for t in 0..TENANTS {
        let tenant = format!("t{t}");
        set_limit(&mut app, &tenant, LIMIT as i32).await;
        // Two queues, so claimers serving different ones see different runs of the
        // tenant: only the limit itself can keep them from claiming LIMIT each.
        let runs = (0..40)
            .map(|i| {
                let mut request = run_request(&format!("{tenant} {i}"));
                request.queue = format!("q{}", i % 2);
                request
            })
            .collect();
        app.runs
            .create_runs(as_tenant(&tenant, proto::CreateRunsRequest { runs }))
            .await
            .expect("create runs");
    }

    // Eight claimers fire together, round after round, so their claims overlap.
    let claimers = 8;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(claimers));
    let mut tasks = Vec::new();
    for i in 0..claimers {
        let mut client = app.runners.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut me = runner(&format!("claimer-{i}"));
            me.queues = vec![format!("q{}", i % 2)];
            let mut mine = 0;
            for _ in 0..TENANTS * 2 {
                barrier.wait().await;
                mine += client
                    .claim_runs(proto::ClaimRunsRequest {
                        runner: Some(me.clone()),
                        max_runs: 3,
                    })
                    .await
                    .expect("claim runs")
                    .into_inner()
                    .assignments
                    .len();
            }
            mine
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("claimer");
    }
    let over: Vec<(String, i64)> = app
        .db()
        .await
        .query(
            "SELECT tenant_id, count(*) FROM runs WHERE status = 'claimed'
             GROUP BY tenant_id HAVING count(*) <> $1",
            &[&LIMIT],
        )
        .await
        .expect("count")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        over.is_empty(),
        "tenants not at exactly their limit: {over:?}"
    );
    assert_eq!(total, TENANTS * LIMIT as usize);
}

#[tokio::test]
async fn the_default_tenant_limit_applies_to_tenants_without_their_own() {
    let mut app = TestApp::spawn_with(|s| s.tenant_max_active_runs = 1).await;
    create_for(&mut app, "a", 3).await;
    create_for(&mut app, "b", 3).await;
    set_limit(&mut app, "b", 2).await;
    let got = claim_batch(&mut app, &runner("r"), 10).await;
    assert_eq!((count_of(&got, "a"), count_of(&got, "b")), (1, 2));
    let stats = tenant_stats(&mut app, "a").await.expect("a has stats");
    assert_eq!(stats.max_active_runs, 1);
}

#[tokio::test]
async fn tenant_limits_are_validated() {
    let mut app = TestApp::spawn().await;
    for (tenant_id, max_active_runs, field) in [
        ("", 1, "tenant_id"),
        ("has space", 1, "tenant_id"),
        ("a", -1, "max_active_runs"),
    ] {
        let err = app
            .admin
            .set_tenant_limit(proto::SetTenantLimitRequest {
                tenant_id: tenant_id.into(),
                max_active_runs,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
}

#[tokio::test]
async fn a_delayed_run_is_not_claimed_before_its_time() {
    let mut app = TestApp::spawn().await;
    let mut request = run_request("later");
    request.scheduled_at = Some(timestamp_in(Duration::from_millis(1500)));
    let run = app
        .runs
        .create_run(request)
        .await
        .expect("create")
        .into_inner()
        .run
        .expect("run");
    let scheduled_at = system_time(&run.scheduled_at);
    let created = Instant::now();

    let me = runner("early");
    // For about a second nothing is claimable.
    while created.elapsed() < Duration::from_secs(1) {
        assert!(
            claim_batch(&mut app, &me, 10).await.is_empty(),
            "a delayed run was claimed early"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = claim(&mut app, &me, 1).await;
    assert_eq!(run_id_of(&got[0]), run.run_id);
    let claimed = get_run(&mut app, &run.run_id).await;
    assert!(system_time(&claimed.claimed_at) >= scheduled_at);
}

#[tokio::test]
async fn scheduled_at_is_validated_and_part_of_idempotency() {
    let mut app = TestApp::spawn().await;
    let mut too_far = run_request("far");
    too_far.scheduled_at = Some(timestamp_in(Duration::from_secs(400 * 24 * 3600)));
    let err = app
        .runs
        .create_run(too_far.clone())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("scheduled_at"), "{}", err.message());
    let err = app
        .runs
        .create_runs(proto::CreateRunsRequest {
            runs: vec![run_request("fine"), too_far],
        })
        .await
        .expect_err("refused");
    assert!(
        err.message().contains("runs[1].scheduled_at"),
        "{}",
        err.message()
    );

    // A time in the past means at once.
    let mut past = run_request("past");
    past.scheduled_at = Some(Timestamp::from(SystemTime::now() - Duration::from_secs(60)));
    let past_id = app
        .runs
        .create_run(past)
        .await
        .expect("created")
        .into_inner()
        .run
        .expect("run")
        .run_id;
    let got = claim(&mut app, &runner("now"), 1).await;
    assert_eq!(run_id_of(&got[0]), past_id);

    // The queue timeout of a delayed run counts from its start time, not from creation.
    let mut waits = run_request("waits");
    waits.scheduled_at = Some(timestamp_in(Duration::from_secs(3600)));
    waits.queue_timeout_ms = 1000;
    let waits = app
        .runs
        .create_run(waits)
        .await
        .expect("created")
        .into_inner()
        .run
        .expect("run");
    let run_id: uuid::Uuid = waits.run_id.parse().expect("uuid");
    let deadline: SystemTime = app
        .db()
        .await
        .query_one("SELECT queue_deadline FROM runs WHERE id = $1", &[&run_id])
        .await
        .expect("queue deadline")
        .get(0);
    assert!(deadline > system_time(&waits.scheduled_at));

    // The same key with the same time is a retry; with another time, a conflict.
    let at = timestamp_in(Duration::from_secs(3600));
    let mut keyed = run_request("keyed");
    keyed.idempotency_key = "delayed-1".into();
    keyed.scheduled_at = Some(at);
    let first = app.runs.create_run(keyed.clone()).await.expect("created");
    assert!(first.into_inner().created);
    let again = app.runs.create_run(keyed.clone()).await.expect("retried");
    assert!(!again.into_inner().created);
    keyed.scheduled_at = Some(Timestamp {
        seconds: at.seconds + 1,
        nanos: at.nanos,
    });
    let err = app
        .runs
        .create_run(keyed)
        .await
        .expect_err("conflicting reuse");
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn a_runner_process_completes_a_delayed_run_after_its_time() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "patient", &[]);
    let mut request = run_request("wake me later");
    request.scheduled_at = Some(timestamp_in(Duration::from_millis(1500)));
    let run = app
        .runs
        .create_run(request)
        .await
        .expect("create")
        .into_inner()
        .run
        .expect("run");
    // Nothing else is created: the runner's session picks the run up on its own poll.
    let done = wait_for_run(&app, &run.run_id, RunStatus::Completed, LONG).await;
    assert!(system_time(&done.claimed_at) >= system_time(&run.scheduled_at));
}

#[tokio::test]
async fn an_operator_drains_a_runner_through_another_replica() {
    let mut app = TestApp::spawn().await;
    let mut process = RunnerProcess::start(
        app.addr,
        "drain-me",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20")],
    );
    let slow = app
        .runs
        .create_run(run_request("[slow] a long story"))
        .await
        .expect("create")
        .into_inner()
        .run
        .expect("run")
        .run_id;
    let running = wait_for_run(&app, &slow, RunStatus::Running, LONG).await;

    // ListRunners shows the runner with the lease it holds.
    let admin = app.admin.clone();
    let listed = wait_for("the runner listed with its lease", LONG, || {
        let mut admin = admin.clone();
        let slow = slow.clone();
        async move {
            admin
                .list_runners(proto::ListRunnersRequest {})
                .await
                .ok()?
                .into_inner()
                .runners
                .into_iter()
                .find(|r| r.name == "drain-me" && r.leases.iter().any(|l| l.run_id == slow))
        }
    })
    .await;
    uuid::Uuid::parse_str(&listed.replica_id).expect("the replica holding its stream");
    assert!(!listed.draining);
    assert!(listed.backend_profiles.contains(&"scripted".to_owned()));
    assert!(listed.last_heartbeat_at.is_some());
    let lease = listed
        .leases
        .iter()
        .find(|l| l.run_id == slow)
        .expect("lease");
    assert_eq!(lease.epoch, running.lease_epoch);

    // Drained through a second replica: the runner is connected to the first.
    let mut other = TestApp::spawn_on(&app.database_url, |_| {}).await;
    let drained = other
        .admin
        .drain_runner(proto::DrainRunnerRequest {
            runner_id: listed.runner_id.clone(),
        })
        .await
        .expect("drain")
        .into_inner();
    assert!(drained.found);
    let later = app
        .runs
        .create_run(run_request("after the drain"))
        .await
        .expect("create")
        .into_inner()
        .run
        .expect("run")
        .run_id;

    let status = process.wait_exit(LONG).await;
    assert!(status.success(), "the drained runner exited with {status}");
    let finished = get_run(&mut app, &slow).await;
    assert_eq!(
        status_of(&finished),
        RunStatus::Completed,
        "the running run was finished, not released"
    );
    let untouched = get_run(&mut app, &later).await;
    assert_eq!(status_of(&untouched), RunStatus::Pending);
    assert_eq!(untouched.lease_epoch, 0, "no new work was taken");

    let runners = other
        .admin
        .list_runners(proto::ListRunnersRequest {})
        .await
        .expect("list")
        .into_inner()
        .runners;
    let after = runners
        .iter()
        .find(|r| r.runner_id == listed.runner_id)
        .expect("still listed");
    assert!(after.draining);
    assert!(after.leases.is_empty());
}

#[tokio::test]
async fn draining_unknown_or_malformed_runners() {
    let mut app = TestApp::spawn().await;
    let unknown = app
        .admin
        .drain_runner(proto::DrainRunnerRequest {
            runner_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .expect("drain")
        .into_inner();
    assert!(!unknown.found);
    for bad in ["", "not-a-uuid"] {
        let err = app
            .admin
            .drain_runner(proto::DrainRunnerRequest {
                runner_id: bad.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("runner_id"), "{}", err.message());
    }
}

#[tokio::test]
async fn a_drained_runner_is_assigned_nothing() {
    let mut app = TestApp::spawn().await;
    let me = runner("unary");
    assert!(claim_batch(&mut app, &me, 1).await.is_empty());
    let drained = app
        .admin
        .drain_runner(proto::DrainRunnerRequest {
            runner_id: me.runner_id.clone(),
        })
        .await
        .expect("drain")
        .into_inner();
    assert!(drained.found);
    create_for(&mut app, "a", 2).await;
    assert!(claim_batch(&mut app, &me, 10).await.is_empty());
    assert_eq!(claim_batch(&mut app, &runner("fresh"), 10).await.len(), 2);
}
