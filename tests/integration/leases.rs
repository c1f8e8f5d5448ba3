//! Claims and fenced writes: one holder per run, stale epochs refused, gapless seq.
//! (Resent, reordered and unacknowledged batches: `faults`.)

use std::collections::HashSet;

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use tonic::Code;

#[tokio::test]
async fn concurrent_claimers_never_get_the_same_run() {
    // Nothing heartbeats here: leases must outlast a slow machine.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let runs: Vec<_> = (0..300).map(|i| run_request(&format!("job {i}"))).collect();
    app.runs
        .create_runs(proto::CreateRunsRequest { runs })
        .await
        .unwrap();

    let mut claimers = Vec::new();
    for i in 0..8 {
        let mut client = app.runners.clone();
        claimers.push(tokio::spawn(async move {
            let me = runner(&format!("claimer-{i}"));
            let mut mine = Vec::new();
            loop {
                let got = client
                    .claim_runs(proto::ClaimRunsRequest {
                        runner: Some(me.clone()),
                        max_runs: 7,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .assignments;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|a| a.run.unwrap().run_id));
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for claimer in claimers {
        for run_id in claimer.await.unwrap() {
            total += 1;
            assert!(
                seen.insert(run_id.clone()),
                "run {run_id} was claimed twice"
            );
        }
    }
    assert_eq!(total, 300);
    let epochs: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM runs WHERE lease_epoch = 1 AND status = 'claimed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(epochs, 300);
}

#[tokio::test]
async fn claims_match_queue_labels_and_profile_by_priority() {
    let mut app = TestApp::spawn().await;
    let mut gpu = run_request("needs a gpu");
    gpu.labels = vec!["gpu".into()];
    let mut other_queue = run_request("elsewhere");
    other_queue.queue = "batch".into();
    let mut other_profile = run_request("other model");
    other_profile.backend_profile = "openai:gpt-4o-mini".into();
    let low = run_request("low");
    let mut high = run_request("high");
    high.priority = 10;
    for r in [gpu, other_queue, other_profile, low, high] {
        app.runs.create_run(r).await.unwrap();
    }

    let plain = runner("plain");
    let got = app
        .runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(plain),
            max_runs: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .assignments;
    let prompts: Vec<String> = got
        .iter()
        .map(|a| a.run.as_ref().unwrap().input_json.clone())
        .collect();
    assert_eq!(prompts.len(), 2, "{prompts:?}");
    assert!(
        prompts[0].contains("high") && prompts[1].contains("low"),
        "{prompts:?}"
    );

    let mut gpu_runner = runner("gpu");
    gpu_runner.labels = vec!["gpu".into(), "linux".into()];
    gpu_runner.queues = vec!["default".into(), "batch".into()];
    let got = app
        .runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(gpu_runner),
            max_runs: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .assignments;
    assert_eq!(got.len(), 2, "the gpu run and the batch-queue run");
}

#[tokio::test]
async fn a_stale_epoch_cannot_append_or_finish() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 300).await;
    let run = app
        .runs
        .create_run(run_request("contested"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let old = runner("old");
    let stale = claim(&mut app, &old, 1).await.remove(0);
    app.runners
        .append_events(append(&old, &stale, deltas(1, 2)))
        .await
        .unwrap();

    // The old runner goes quiet; the lease expires and another runner takes over.
    let new = runner("new");
    let current = claim(&mut app, &new, 1).await.remove(0);
    assert_eq!(current.epoch, stale.epoch + 1);
    assert_eq!(current.run.as_ref().unwrap().attempt, 2);

    let err = app
        .runners
        .append_events(append(&old, &stale, deltas(3, 4)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().starts_with("lease_lost"), "{}", err.message());
    assert_eq!(err.metadata().get("agentrun-error").unwrap(), "lease_lost");
    let err = app
        .runners
        .finish_run(finish(&old, &stale, RunStatus::Completed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Naming the current epoch is not enough for another runner.
    let mut forged = append(&old, &current, deltas(1, 1));
    forged.runner_id = old.runner_id.clone();
    assert_eq!(
        app.runners.append_events(forged).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    app.runners
        .append_events(append(&new, &current, deltas(1, 2)))
        .await
        .unwrap();
    let done = app
        .runners
        .finish_run(finish(&new, &current, RunStatus::Completed))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status_of(&done), RunStatus::Completed);
    // A resent finish (lost acknowledgement) returns the same outcome.
    let again = app
        .runners
        .finish_run(finish(&new, &current, RunStatus::Completed))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(again.finished_at, done.finished_at);

    let types = event_types(&mut app, &run.run_id).await;
    let runner_events = app
        .db()
        .await
        .query(
            "SELECT runner_id FROM events WHERE producer = 'runner' AND epoch = $1",
            &[&stale.epoch],
        )
        .await
        .unwrap();
    assert_eq!(
        runner_events.len(),
        2,
        "only the stale runner's events from before it lost the lease"
    );
    assert_eq!(types.last().unwrap(), "run.terminal");
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn seq_stays_gapless_under_concurrent_appenders() {
    // Nothing heartbeats here: the lease must outlast a slow machine.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let run = app
        .runs
        .create_run(run_request("busy"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let me = runner("r");
    let a = claim(&mut app, &me, 1).await.remove(0);

    // The runner streams batches while clients send commands to the same run: both
    // allocate seqs from the same counter.
    let mut runner_client = app.runners.clone();
    let (me2, a2) = (me.clone(), a.clone());
    let appender = tokio::spawn(async move {
        for batch in 0..40 {
            let from = batch * 5 + 1;
            runner_client
                .append_events(append(&me2, &a2, deltas(from, from + 4)))
                .await
                .unwrap();
        }
    });
    let mut senders = Vec::new();
    for i in 0..4 {
        let mut client = app.runs.clone();
        let run_id = run.run_id.clone();
        senders.push(tokio::spawn(async move {
            for j in 0..10 {
                client
                    .send_command(proto::SendCommandRequest {
                        run_id: run_id.clone(),
                        kind: proto::CommandKind::Steer as i32,
                        payload_json: serde_json::json!({"text": format!("{i}-{j}")}).to_string(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    appender.await.unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let db = app.db().await;
    let seqs: Vec<i64> = db
        .query(
            "SELECT seq FROM events WHERE run_id = $1 ORDER BY seq",
            &[&uuid::Uuid::parse_str(&run.run_id).unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // run.created, command.created, run.claimed, command.delivered, run.started,
    // 200 deltas, 40 command.created.
    assert_eq!(seqs.len(), 245);
    assert_eq!(seqs, (1..=245).collect::<Vec<i64>>());
    assert_event_log_consistent(&db).await;
}

#[tokio::test]
async fn heartbeats_renew_leases_and_report_lost_ones() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 400).await;
    let runs: Vec<_> = (0..3).map(|i| run_request(&format!("hb {i}"))).collect();
    app.runs
        .create_runs(proto::CreateRunsRequest { runs })
        .await
        .unwrap();
    let me = runner("r");
    let held = claim(&mut app, &me, 3).await;
    let leases: Vec<proto::LeaseRef> = held
        .iter()
        .map(|a| proto::LeaseRef {
            run_id: a.run.as_ref().unwrap().run_id.clone(),
            epoch: a.epoch,
        })
        .collect();

    // Keep heartbeating well past the TTL: every lease stays held, no run is requeued.
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(1500) {
        let beat = app
            .runners
            .heartbeat(proto::HeartbeatRequest {
                runner_id: me.runner_id.clone(),
                leases: leases.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            beat.leases.iter().all(|l| l.held),
            "a heartbeated lease was lost"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let requeued: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE type = 'run.requeued'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(requeued, 0);

    // A stale epoch is reported lost.
    let mut stale = leases.clone();
    stale[1].epoch += 1;
    let beat = app
        .runners
        .heartbeat(proto::HeartbeatRequest {
            runner_id: me.runner_id.clone(),
            leases: stale,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        beat.leases.iter().map(|l| l.held).collect::<Vec<_>>(),
        [true, false, true]
    );
}

/// Blocks of the runs' out-of-line storage (TOAST: large inputs) read in one database.
struct ToastReads {
    url: String,
    name: String,
    cluster: tokio_postgres::Client,
}

impl ToastReads {
    async fn of(url: &str) -> Self {
        let name = db_client(url)
            .await
            .query_one("SELECT current_database()", &[])
            .await
            .expect("name the database")
            .get(0);
        Self {
            url: url.to_owned(),
            name,
            cluster: cluster_client().await,
        }
    }

    /// The blocks read so far, once every connection to the database has closed (a
    /// backend flushes its statistics as it exits). Read from inside (the statistics are
    /// per database) over a connection that reads no run and is closed again.
    async fn settled(&self) -> i64 {
        crate::hellos::disconnected(&self.cluster, &self.name).await;
        let read = db_client(&self.url)
            .await
            .query_one(
                "SELECT coalesce(toast_blks_hit + toast_blks_read, 0) FROM pg_statio_user_tables
                 WHERE relname = 'runs'",
                &[],
            )
            .await
            .expect("read the table's I/O statistics")
            .get(0);
        crate::hellos::disconnected(&self.cluster, &self.name).await;
        read
    }
}

/// A run whose input holds 128 KiB that does not compress (half the input limit):
/// PostgreSQL stores it out of line.
fn long_context_run() -> proto::CreateRunRequest {
    let context: String = (0..4_096)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    proto::CreateRunRequest {
        input_json: serde_json::json!({ "prompt": "go", "context": context }).to_string(),
        ..run_request("a long context")
    }
}

/// A heartbeat moves a lease's expiry on without writing an index entry: the renewal
/// is a heap-only (HOT) update of the run row. Every active run is renewed every
/// heartbeat interval for as long as it runs, so with the expiry indexed each renewal
/// wrote a new entry in every index of `runs` (five for an active run) and left as many
/// dead ones to vacuum.
#[tokio::test]
async fn renewing_a_lease_writes_no_index_entry() {
    const RENEWALS: i64 = 10;
    // Heartbeats come at most four per interval.
    let mut app = TestApp::spawn_with(|s| s.heartbeat_interval_ms = 100).await;
    app.runs.create_run(run_request("held")).await.unwrap();
    let me = runner("r");
    let held = claim(&mut app, &me, 1).await.remove(0);
    let lease = proto::LeaseRef {
        run_id: held.run.as_ref().unwrap().run_id.clone(),
        epoch: held.epoch,
    };
    for _ in 0..RENEWALS {
        let beat = app
            .runners
            .heartbeat(proto::HeartbeatRequest {
                runner_id: me.runner_id.clone(),
                leases: vec![lease.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(beat.leases[0].held, "the lease was lost");
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }

    let (hot, all) = table_counters(
        &app,
        "SELECT n_tup_hot_upd, n_tup_upd FROM pg_stat_user_tables WHERE relname = 'runs'",
        |hot, _| hot >= RENEWALS,
    )
    .await;
    assert!(
        hot >= RENEWALS,
        "{RENEWALS} renewals made {hot} heap-only updates of runs ({all} updates in all)"
    );
}

/// A heartbeat finds its runner by key, never by scanning `runners`, also once a fleet
/// has connected after the renewals' connections made their plans. (A heartbeat
/// transaction planned without the hot paths' settings scanned every registered runner
/// in the benchmark's fleet: about half a millisecond of database time per transaction
/// at 5,000 runners, growing with them.)
#[tokio::test]
async fn heartbeats_find_their_runner_by_key() {
    const HEARTBEATS: i64 = 24;
    let mut app = TestApp::spawn_with(|s| s.heartbeat_interval_ms = 100).await;
    app.runs.create_run(run_request("held")).await.unwrap();
    let me = runner("r");
    claim(&mut app, &me, 1).await;
    for beat in 0..HEARTBEATS {
        if beat == HEARTBEATS / 2 {
            // Each of the renewals' two connections has run the statement six times, on
            // a table of one runner. Then a fleet connects.
            app.db()
                .await
                .batch_execute(
                    "INSERT INTO runners (id, name) SELECT gen_random_uuid(), 'idle-' || g
                     FROM generate_series(1, 2000) g",
                )
                .await
                .unwrap();
        }
        app.runners
            .heartbeat(proto::HeartbeatRequest {
                runner_id: me.runner_id.clone(),
                leases: vec![],
            })
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }

    let (scans, lookups) = table_counters(
        &app,
        "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0)
         FROM pg_stat_user_tables WHERE relname = 'runners'",
        |_, lookups| lookups >= HEARTBEATS,
    )
    .await;
    assert!(
        lookups >= HEARTBEATS,
        "{HEARTBEATS} heartbeats made {lookups} index scans of runners ({scans} scans)"
    );
    // Others may scan it now and then (forgetting runners gone for a day).
    assert!(
        scans < HEARTBEATS / 4,
        "runners was scanned {scans} times ({lookups} index scans)"
    );
}

/// Two counters of the test database's statistics (`sql` reads them), once `enough`
/// says so or after 30 s: backends report theirs within seconds of going idle.
async fn table_counters(app: &TestApp, sql: &str, enough: impl Fn(i64, i64) -> bool) -> (i64, i64) {
    let db = app.db().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let row = db.query_one(sql, &[]).await.unwrap();
        let counters = (row.get(0), row.get(1));
        if enough(counters.0, counters.1) || std::time::Instant::now() > deadline {
            return counters;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A claim reads `commands` only for runs that have a command there. The usual run's one
/// command, its first turn, is carried by its own row: leasing it, delivering that turn
/// and handing it over probe no index of `commands` (they did, once per run). A run
/// with a steer sent before the claim still gets both, in seq order.
#[tokio::test]
async fn a_claim_reads_commands_only_for_runs_that_have_some() {
    use agentrun_manager::store::leases;
    use agentrun_shared::state::CommandStatus;

    let (url, pool) = database_with_runs(20).await;
    let me = store_runner("reader");
    let before = command_reads(&pool).await;
    let claimed = leases::claim(&pool, &me, true, 100, STORE_TTL, 0)
        .await
        .expect("claim");
    let after = command_reads(&pool).await;
    assert_eq!(claimed.len(), 20);
    for assignment in &claimed {
        let [turn] = assignment.commands.as_slice() else {
            panic!("one command: {:?}", assignment.commands);
        };
        assert_eq!(Some(turn.id), assignment.run.first_turn_id);
        assert_eq!(turn.status, CommandStatus::Delivered);
        assert!(turn.payload["prompt"].as_str().unwrap().starts_with("run "));
    }
    // Read from the run's row, the turn is what `run_commands` shows.
    let turn = &claimed[0].commands[0];
    let shown = db_client(&url)
        .await
        .query_one(
            "SELECT run_id, seq, kind, payload, status, delivery_policy, idempotency_key,
                    error, created_at, updated_at
             FROM run_commands WHERE id = $1",
            &[&turn.id.0],
        )
        .await
        .expect("the turn in run_commands");
    assert_eq!(
        (
            shown.get::<_, uuid::Uuid>(0),
            shown.get::<_, i64>(1),
            shown.get::<_, String>(2),
            shown.get::<_, serde_json::Value>(3),
            shown.get::<_, String>(4),
            shown.get::<_, Option<String>>(5),
            shown.get::<_, Option<String>>(6),
            shown.get::<_, Option<String>>(7),
            shown.get::<_, std::time::SystemTime>(8),
            shown.get::<_, std::time::SystemTime>(9),
        ),
        (
            turn.run_id.0,
            turn.seq,
            turn.kind.as_str().to_owned(),
            turn.payload.clone(),
            turn.status.as_str().to_owned(),
            turn.delivery_policy.map(|p| p.as_str().to_owned()),
            turn.idempotency_key.clone(),
            turn.error.clone(),
            turn.created_at,
            turn.updated_at,
        )
    );
    assert_eq!(
        after, before,
        "claiming runs without commands of their own read the commands' indexes"
    );

    let (_, steered) = claim_a_steered_run(&url, &pool, &me).await;
    let seqs: Vec<(i64, CommandStatus)> =
        steered.commands.iter().map(|c| (c.seq, c.status)).collect();
    assert_eq!(
        seqs,
        [(1, CommandStatus::Delivered), (2, CommandStatus::Delivered)]
    );
    assert_eq!(steered.commands[1].payload["text"], "left");
}

/// Ending runs reads `commands` only for runs that have a command there. A runner that
/// reports the first turn completed and finishes the run in one batch (the usual run)
/// has its report checked, the run's open commands counted and its untaken turns looked
/// for without a probe of the commands' indexes (they did, twice per run). A run with a
/// steer delivered at the claim and still open ends with the steer closed.
#[tokio::test]
async fn ending_runs_reads_commands_only_for_runs_that_have_some() {
    use agentrun_manager::store::commands::CommandUpdate;
    use agentrun_manager::store::leases::{self, LeaseWrite, RunnerEvent, Written};
    use agentrun_manager::store::runs::Finish;
    use agentrun_shared::events::EventType;
    use agentrun_shared::state::{CommandStatus, RunStatus};

    let (url, pool, me, claimed) = claimed_runs(10, "finisher").await;
    let ending = |assignment: &leases::Assignment| {
        let run_id = assignment.run.id;
        let turn = assignment.commands[0].id;
        let epoch = assignment.run.lease_epoch;
        let started = format!(r#"{{"turn_id":"{turn}","command_id":"{turn}","seq":1}}"#);
        let completed = format!(r#"{{"turn_id":"{turn}","state":"completed"}}"#);
        vec![
            LeaseWrite::Append {
                run_id,
                epoch,
                events: vec![
                    RunnerEvent::as_sent(1, EventType::TurnStarted, started),
                    RunnerEvent::as_sent(2, EventType::TurnCompleted, completed),
                ],
                updates: vec![CommandUpdate {
                    command_id: turn,
                    status: CommandStatus::Completed,
                    error: None,
                }],
            },
            LeaseWrite::Finish {
                epoch,
                outcome: Finish {
                    run_id,
                    status: RunStatus::Completed,
                    failure_kind: None,
                    message: None,
                },
                last_runner_seq: 2,
            },
        ]
    };
    let quotas = test_settings(&url).quotas();
    let before = command_reads(&pool).await;
    let written = leases::write(
        &pool,
        me.id,
        None,
        claimed.iter().flat_map(ending).collect(),
        &quotas,
    )
    .await
    .expect("the batch is stored");
    let after = command_reads(&pool).await;
    for outcome in written {
        if let Written::Finished(run, _) = outcome.expect("each write is stored") {
            assert_eq!(run.status, RunStatus::Completed);
        }
    }
    assert_eq!(
        after, before,
        "ending runs without commands of their own read the commands' indexes"
    );
    let db = db_client(&url).await;
    let turns: Vec<(String, i64)> = db
        .query(
            "SELECT first_turn_status, last_event_seq FROM runs ORDER BY id",
            &[],
        )
        .await
        .expect("read the runs")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Created (2), claimed (2), run.started, the runner's two, the turn's report and
    // run.terminal: gapless, each counted once.
    assert!(
        turns.iter().all(|t| *t == ("completed".to_string(), 9)),
        "{turns:?}"
    );

    // A steer delivered at the claim, never reported: closed as the run ends.
    let (run_id, steered) = claim_a_steered_run(&url, &pool, &me).await;
    leases::write(&pool, me.id, None, ending(&steered), &quotas)
        .await
        .expect("the batch is stored")
        .into_iter()
        .for_each(|w| {
            w.expect("each write is stored");
        });
    let statuses: Vec<String> = db
        .query(
            "SELECT status FROM run_commands WHERE run_id = $1::text::uuid ORDER BY seq",
            &[&run_id],
        )
        .await
        .expect("read the commands")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["completed", "cancelled"]);
}

/// A heartbeat reads `commands` only for runs that have a command there: renewing the
/// leases of runs whose one command is the first turn they were claimed with probes no
/// index of `commands` (it did, once per lease, every heartbeat). A steer sent after
/// the claim still goes with the next heartbeat.
#[tokio::test]
async fn heartbeats_read_commands_only_for_runs_that_have_some() {
    use agentrun_manager::store::leases::{self, Heartbeat};

    let (url, pool, me, claimed) = claimed_runs(10, "beating").await;
    let beat = |claimed: &[leases::Assignment]| Heartbeat {
        runner_id: me.id,
        tenant: None,
        leases: claimed
            .iter()
            .map(|a| (a.run.id, a.run.lease_epoch))
            .collect(),
    };
    let before = command_reads(&pool).await;
    let renewed = leases::heartbeat(&pool, &[beat(&claimed)], STORE_TTL)
        .await
        .expect("heartbeat");
    let after = command_reads(&pool).await;
    assert!(
        renewed[0]
            .leases
            .iter()
            .all(|l| l.expires_at.is_some() && l.commands.is_empty()),
        "{renewed:?}"
    );
    assert_eq!(
        after, before,
        "renewing leases of runs without commands of their own read the commands' indexes"
    );

    steer(
        &mut crate::hellos::quiet_app_on(&url).await,
        &claimed[3].run.id.to_string(),
    )
    .await;
    let renewed = leases::heartbeat(&pool, &[beat(&claimed)], STORE_TTL)
        .await
        .expect("heartbeat");
    let delivered: Vec<(usize, i64)> = renewed[0]
        .leases
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.commands.iter().map(move |c| (i, c.seq)))
        .collect();
    assert_eq!(delivered, [(3, 2)], "the steer goes with the heartbeat");
}

/// Leases taken through the store in these tests outlast them.
const STORE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// A fresh database holding `runs` new runs, and a pool of one connection to it.
async fn database_with_runs(runs: usize) -> (String, agentrun_manager::db::Pool) {
    let url = fresh_database().await;
    let mut app = crate::hellos::quiet_app_on(&url).await;
    for i in 0..runs {
        app.runs
            .create_run(run_request(&format!("run {i}")))
            .await
            .expect("create a run");
    }
    drop(app);
    let pool = agentrun_manager::db::pool(&url, 1).expect("pool");
    (url, pool)
}

/// [`database_with_runs`], and the runs claimed through the store by a runner `name`.
async fn claimed_runs(
    runs: usize,
    name: &str,
) -> (
    String,
    agentrun_manager::db::Pool,
    agentrun_manager::store::leases::RunnerIdentity,
    Vec<agentrun_manager::store::leases::Assignment>,
) {
    let (url, pool) = database_with_runs(runs).await;
    let me = store_runner(name);
    let claimed = agentrun_manager::store::leases::claim(&pool, &me, true, 100, STORE_TTL, 0)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), runs);
    (url, pool, me, claimed)
}

/// Sends the run a steer (`{"text": "left"}`).
async fn steer(app: &mut TestApp, run_id: &str) {
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.into(),
            kind: proto::CommandKind::Steer as i32,
            payload_json: r#"{"text": "left"}"#.into(),
            ..Default::default()
        })
        .await
        .expect("steer");
}

/// Creates a run, steers it before any runner has it, and claims it for `me`: its id
/// and its assignment.
async fn claim_a_steered_run(
    url: &str,
    pool: &agentrun_manager::db::Pool,
    me: &agentrun_manager::store::leases::RunnerIdentity,
) -> (String, agentrun_manager::store::leases::Assignment) {
    let mut app = crate::hellos::quiet_app_on(url).await;
    let run_id = app
        .runs
        .create_run(run_request("steered"))
        .await
        .expect("create a run")
        .into_inner()
        .run
        .expect("the run")
        .run_id;
    steer(&mut app, &run_id).await;
    drop(app);
    let [steered] = agentrun_manager::store::leases::claim(pool, me, false, 100, STORE_TTL, 0)
        .await
        .expect("claim")
        .try_into()
        .expect("one run claimed");
    (run_id, steered)
}

/// A runner identity for the store's own calls, serving the scripted profile.
fn store_runner(name: &str) -> agentrun_manager::store::leases::RunnerIdentity {
    agentrun_manager::store::leases::RunnerIdentity {
        id: agentrun_shared::ids::RunnerId(uuid::Uuid::new_v4()),
        name: name.into(),
        labels: Vec::new(),
        backend_profiles: vec!["scripted".into()],
        queues: vec!["default".into()],
        max_concurrency: 100,
        version: String::new(),
        tenant: None,
    }
}

/// Scans of `commands` and of its indexes so far, once `pool`'s one connection is the
/// database's only one (a dropped app's have closed, reporting theirs) and has flushed
/// its statistics (forced, so no wait).
async fn command_reads(pool: &agentrun_manager::db::Pool) -> i64 {
    let client = pool.get().await.expect("a connection");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let others: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("list the connections")
            .get(0);
        if others == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{others} other connections stay open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    flush_statistics(&client).await;
    client
        .query_one(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables
             WHERE relname = 'commands'",
            &[],
        )
        .await
        .expect("read the statistics")
        .get(0)
}

/// A runner's appends do not read the run's input: a long prompt or a conversation's
/// context costs its size once, at the claim that delivers it, not again in every
/// lease-write transaction while the run streams.
#[tokio::test]
async fn appends_do_not_read_the_runs_input() {
    use agentrun_manager::db;
    use agentrun_manager::store::leases::{self, LeaseWrite, RunnerEvent};
    use agentrun_shared::events::EventType;
    use agentrun_shared::ids::{RunId, RunnerId};

    let url = fresh_database().await;
    let toast = ToastReads::of(&url).await;
    let mut app = crate::hellos::quiet_app_on(&url).await;
    app.runs
        .create_run(long_context_run())
        .await
        .expect("create the run");
    let me = runner("streaming");
    let lease = claim(&mut app, &me, 1).await.remove(0);
    let run_id = RunId::parse("run_id", &lease.run.as_ref().unwrap().run_id).unwrap();
    let runner_id = RunnerId::parse("runner_id", &me.runner_id).unwrap();
    drop(app);
    let before = toast.settled().await;

    let pool = db::pool(&url, 1).expect("pool");
    let quotas = test_settings(&url).quotas();
    for batch in 0..10 {
        let events = (1..=10)
            .map(|i| {
                let runner_seq = batch * 10 + i;
                let text = format!(r#"{{"kind":"assistant_text","delta":"token {runner_seq} "}}"#);
                RunnerEvent::as_sent(runner_seq, EventType::ContentDelta, text)
            })
            .collect();
        let append = LeaseWrite::Append {
            run_id,
            epoch: lease.epoch,
            events,
            updates: vec![],
        };
        leases::write(&pool, runner_id, None, vec![append], &quotas)
            .await
            .expect("the batch is stored")
            .remove(0)
            .expect("the append is stored");
    }
    drop(pool);
    let read = toast.settled().await - before;
    assert_eq!(
        read, 0,
        "ten appends read {read} blocks of the run's out-of-line input"
    );

    // What the lease writes read instead of `runs.*` names every other column, in order.
    let columns: String = db_client(&url)
        .await
        .query_one(
            "SELECT string_agg(CASE WHEN attname IN ('input', 'metadata')
                                    THEN '''null''::jsonb AS ' || attname
                                    ELSE 'runs.' || attname END, ', ' ORDER BY attnum)
             FROM pg_attribute
             WHERE attrelid = 'runs'::regclass AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await
        .expect("read the columns of runs")
        .get(0);
    let listed: Vec<&str> = agentrun_manager::store::runs::COLUMNS_BUT_INPUT
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(listed, columns.split(", ").collect::<Vec<_>>());
}

/// Repeating a finish (its answer lost) answers with the run as it ended, whole: its
/// input too, which the lease writes do not read otherwise.
#[tokio::test]
async fn a_repeated_finish_answers_with_the_whole_run() {
    let mut app = TestApp::spawn().await;
    create(&mut app, "finish me twice").await;
    let me = runner("finisher");
    let lease = claim(&mut app, &me, 1).await.remove(0);
    let mut finished = Vec::new();
    for _ in 0..2 {
        let run = app
            .runners
            .finish_run(finish(&me, &lease, RunStatus::Completed))
            .await
            .expect("the finish is answered")
            .into_inner()
            .run
            .expect("with the run");
        finished.push(run);
    }
    let input: serde_json::Value =
        serde_json::from_str(&finished[1].input_json).expect("the input is JSON");
    assert_eq!(input["prompt"], "finish me twice", "{input}");
    assert_eq!(finished[0], finished[1], "the same run, as it ended");
}

/// Reading a run's log does not read its input either: ListEvents, a WatchRun that
/// catches up from the database, and the check that the run is the caller's
/// (ListRequests) read where the run stands, not all of it. (ListCommands does read it:
/// the run's first turn is its input's prompt, carried by the run row.)
#[tokio::test]
async fn reading_a_runs_log_does_not_read_its_input() {
    let url = fresh_database().await;
    let toast = ToastReads::of(&url).await;
    let mut app = crate::hellos::quiet_app_on(&url).await;
    let run_id = app
        .runs
        .create_run(long_context_run())
        .await
        .expect("create the run")
        .into_inner()
        .run
        .expect("the run")
        .run_id;
    drop(app);
    let before = toast.settled().await;

    let mut app = crate::hellos::quiet_app_on(&url).await;
    for _ in 0..5 {
        let page = app
            .runs
            .list_events(proto::ListEventsRequest {
                run_id: run_id.clone(),
                ..Default::default()
            })
            .await
            .expect("list the events")
            .into_inner();
        assert!(!page.events.is_empty() && !page.end_of_run);
    }
    app.runs
        .list_requests(proto::ListRequestsRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list the requests");
    let mut watch = app
        .runs
        .watch_run(proto::WatchRunRequest {
            run_id: run_id.clone(),
            after_seq: 0,
        })
        .await
        .expect("watch the run")
        .into_inner();
    let first = watch
        .message()
        .await
        .expect("a first event")
        .expect("an event");
    assert_eq!(first.r#type, "run.created");
    drop(watch);
    drop(app);
    let read = toast.settled().await - before;
    assert_eq!(
        read, 0,
        "reading the run's log read {read} blocks of its input"
    );
}

/// A claim planned on empty tables reads runs and commands through their indexes, never
/// by scanning a table: runners connect, and claim, before there is any run, and a
/// connection keeps the plan it made then until the tables are next analyzed.
#[tokio::test]
async fn a_claim_planned_on_empty_tables_reads_through_indexes() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let plan = generic_plan(&db, &agentrun_manager::store::leases::CLAIM_SQL).await;
    assert!(
        !plan.contains("Seq Scan on commands"),
        "the claim scans every command to deliver its runs' ones:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on runs"),
        "the claim scans every run:\n{plan}"
    );
}

/// Finishing runs counts each run's open commands (each closes with an event) through the
/// open commands' partial index, in the plan the lease writes keep. With the open
/// statuses a parameter, the planner could not prove the index applies and read every
/// command of every finishing run.
#[tokio::test]
async fn finishing_runs_counts_their_open_commands_through_the_open_index() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let plan = generic_plan(&db, &agentrun_manager::store::runs::MARK_FINISHED_SQL).await;
    assert!(
        plan.contains("using commands_open on commands"),
        "the open commands are not counted through their index:\n{plan}"
    );
}
