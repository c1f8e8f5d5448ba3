//! Retention: the `content.delta` events of runs ended longer than their tenant's
//! retention are compacted into one per item (the text kept whole), in the background,
//! without holding up appends, once per run however many replicas compact.
//!
//! Compaction passes run every 50 ms here, so tests wait on conditions; a run is made
//! due by setting its tenant's retention once everything to compare is read.

use std::collections::BTreeMap;
use std::time::Duration;

use agentrun_manager::db;
use agentrun_manager::retention::MAX_RETENTION_MS;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_manager::store::events::COMPACTED_DELTA_BYTES;
use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic::{Code, Request};
use uuid::Uuid;

use crate::faults::create_all;
use crate::operability::{sample, scrape};

const LONG: Duration = Duration::from_secs(60);

/// A test app whose compactor looks for due runs every 50 ms; retention is forever
/// until a test sets its tenant's. Leases outlive a test-played runner's setup.
async fn app() -> TestApp {
    TestApp::spawn_with(|s| {
        s.event_compaction_interval_ms = 50;
        s.lease_ttl_ms = 120_000;
    })
    .await
}

async fn set_retention(admin: &mut AdminServiceClient<Channel>, tenant: &str, ms: Option<i64>) {
    admin
        .set_tenant_retention(proto::SetTenantRetentionRequest {
            tenant_id: tenant.into(),
            event_retention_ms: ms,
        })
        .await
        .expect("set tenant retention");
}

/// Waits until every run in `run_ids` is marked compacted.
async fn wait_compacted(db: &tokio_postgres::Client, run_ids: &[String]) {
    let ids: Vec<Uuid> = run_ids.iter().map(|id| id.parse().unwrap()).collect();
    wait_for("the runs to be compacted", LONG, || async {
        let row = db
            .query_one(
                "SELECT count(*) FROM runs WHERE id = ANY($1) AND events_compacted_at IS NOT NULL",
                &[&ids],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) == ids.len() as i64).then_some(())
    })
    .await;
}

fn is_delta(event: &proto::Event) -> bool {
    event.r#type == "content.delta"
}

/// The text of each (item, kind) stream of deltas, in seq order.
fn texts_by_item(events: &[proto::Event]) -> BTreeMap<(String, String), String> {
    let mut texts: BTreeMap<(String, String), String> = BTreeMap::new();
    for e in events.iter().filter(|e| is_delta(e)) {
        let p = payload(e);
        let key = (
            p["item_id"].as_str().unwrap_or_default().to_owned(),
            p["kind"].as_str().unwrap().to_owned(),
        );
        texts
            .entry(key)
            .or_default()
            .push_str(p["delta"].as_str().unwrap());
    }
    texts
}

/// Runner events `content.delta` of `item` with runner_seq `from..from + texts.len()`.
fn item_deltas(from: i64, item: &str, texts: &[String]) -> Vec<proto::RunnerEvent> {
    texts
        .iter()
        .zip(from..)
        .map(|(text, runner_seq)| proto::RunnerEvent {
            runner_seq,
            r#type: "content.delta".into(),
            payload_json: json!({"item_id": item, "kind": "assistant_text", "delta": text})
                .to_string(),
        })
        .collect()
}

/// Creates `n` runs, plays a runner that streams `texts` as the deltas of one item into
/// each (with an `item.completed` after them) and completes them all; returns their ids
/// in the order they ended.
async fn completed_runs(app: &mut TestApp, n: usize, texts: &[String]) -> Vec<String> {
    let ids = create_all(
        &mut app.runs,
        (0..n).map(|i| run_request(&format!("run {i}"))).collect(),
    )
    .await;
    let me = proto::RunnerIdentity {
        max_concurrency: n as i32,
        ..runner("player")
    };
    let held = claim(app, &me, n as i32).await;
    let mut ended = Vec::new();
    for lease in &held {
        let mut events = item_deltas(1, "msg-1", texts);
        events.push(proto::RunnerEvent {
            runner_seq: texts.len() as i64 + 1,
            r#type: "item.completed".into(),
            payload_json: json!({"item_id": "msg-1", "kind": "assistant_message",
                                 "text": texts.concat()})
            .to_string(),
        });
        app.runners
            .append_events(append(&me, lease, events))
            .await
            .expect("append the deltas");
        app.runners
            .finish_run(finish(&me, lease, RunStatus::Completed))
            .await
            .expect("finish the run");
        ended.push(lease.run.as_ref().unwrap().run_id.clone());
    }
    assert_eq!(ended.len(), ids.len());
    ended
}

/// A completed run's deltas become one per item holding the whole reply; every other
/// event, the run's last seq and the text read back are unchanged; the missing seqs are
/// skipped by ListEvents and WatchRun, also when a reader resumes at one of them.
#[tokio::test]
async fn a_completed_runs_deltas_are_compacted_per_item_and_its_reply_is_kept() {
    let mut app = app().await;
    let _runner = RunnerProcess::start(
        app.addr,
        "writer",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "0")],
    );
    let run_id = create(&mut app, "[tokens:200] tell me about retention").await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let before = events_of(&mut app, &run_id).await;
    let deltas_before: Vec<&proto::Event> = before.iter().filter(|e| is_delta(e)).collect();
    assert!(
        deltas_before.len() > 1,
        "the reply streamed as several deltas"
    );
    let db = app.db().await;
    let bytes_before: i64 = db
        .query_one(
            "SELECT event_bytes FROM runs WHERE id = $1::text::uuid",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);

    set_retention(&mut app.admin, "default", Some(200)).await;
    let run = wait_for("the run to be compacted", LONG, || {
        let mut app_runs = app.runs.clone();
        let run_id = run_id.clone();
        async move {
            let run = app_runs
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            run.events_compacted_at.is_some().then_some(run)
        }
    })
    .await;
    let after = events_of(&mut app, &run_id).await;

    // The reply is whole, per item and in all.
    assert_eq!(texts_by_item(&after), texts_by_item(&before));
    assert_eq!(assistant_text(&after), assistant_text(&before));
    let completed = after
        .iter()
        .find(|e| e.r#type == "item.completed")
        .expect("item.completed kept");
    assert_eq!(assistant_text(&after), payload(completed)["text"]);
    // One delta per item, at the first delta's seq, saying what it stands for.
    let deltas_after: Vec<&proto::Event> = after.iter().filter(|e| is_delta(e)).collect();
    assert_eq!(deltas_after.len(), texts_by_item(&before).len());
    let merged = payload(deltas_after[0]);
    assert_eq!(deltas_after[0].seq, deltas_before[0].seq);
    assert_eq!(merged["compacted_deltas"], deltas_before.len());
    assert_eq!(
        merged["compacted_through_seq"],
        deltas_before.last().unwrap().seq
    );
    // Nothing else changed.
    let others = |events: &[proto::Event]| -> Vec<proto::Event> {
        events.iter().filter(|e| !is_delta(e)).cloned().collect()
    };
    assert_eq!(others(&after), others(&before));
    assert_eq!(run.last_event_seq, before.last().unwrap().seq);
    let bytes_after: i64 = db
        .query_one(
            "SELECT event_bytes FROM runs WHERE id = $1::text::uuid",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        bytes_after < bytes_before,
        "event_bytes {bytes_before} -> {bytes_after}: the removed rows are subtracted"
    );

    // Resuming at a seq that is gone returns the next stored event.
    let gone = deltas_before[1].seq;
    let expected: Vec<proto::Event> = after.iter().filter(|e| e.seq > gone).cloned().collect();
    let page = app
        .runs
        .list_events(proto::ListEventsRequest {
            run_id: run_id.clone(),
            after_seq: gone,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(page, expected);
    for (after_seq, want) in [(0, after.clone()), (gone, expected)] {
        let mut stream = app
            .runs
            .watch_run(proto::WatchRunRequest {
                run_id: run_id.clone(),
                after_seq,
            })
            .await
            .unwrap()
            .into_inner();
        let mut watched = Vec::new();
        while let Some(event) = tokio::time::timeout(LONG, stream.message())
            .await
            .expect("the watch ends after run.terminal")
            .unwrap()
        {
            watched.push(event);
        }
        assert_eq!(watched, want, "WatchRun after seq {after_seq}");
    }
    assert_event_log_consistent(&db).await;
}

/// Deltas are merged in chunks of about `COMPACTED_DELTA_BYTES`, so a long reply never
/// becomes one event past the payload and page limits.
#[tokio::test]
async fn a_long_reply_is_merged_in_bounded_chunks() {
    let mut app = app().await;
    let piece = "x".repeat(4_000);
    let texts: Vec<String> = (0..40).map(|i| format!("{i:04}{piece}")).collect();
    let run_ids = completed_runs(&mut app, 1, &texts).await;
    set_retention(&mut app.admin, "default", Some(1)).await;
    wait_compacted(&app.db().await, &run_ids).await;

    let after = events_of(&mut app, &run_ids[0]).await;
    let deltas: Vec<&proto::Event> = after.iter().filter(|e| is_delta(e)).collect();
    let total = texts.concat().len() as u64;
    assert_eq!(
        deltas.len() as u64,
        total.div_ceil(COMPACTED_DELTA_BYTES as u64),
        "one merged delta per {COMPACTED_DELTA_BYTES} bytes of text"
    );
    for delta in &deltas {
        let text_len = payload(delta)["delta"].as_str().unwrap().len() as i64;
        assert!(
            text_len <= COMPACTED_DELTA_BYTES + 4_004,
            "{text_len} bytes"
        );
    }
    assert_eq!(assistant_text(&after), texts.concat());
    assert_event_log_consistent(&app.db().await).await;
}

/// Creates an API key straight in the database, as `agentrun-manager keys create` does.
async fn key(database_url: &str, tenant: &str, role: Role) -> String {
    let pool = db::pool(database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    api_keys::create(&client, tenant, role, &[], "retention", None)
        .await
        .expect("create key")
        .key
}

fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("an ASCII header"),
    );
    request
}

/// One tenant's client: its key and a RunService client.
struct Tenant {
    key: String,
    runs: RunServiceClient<Channel>,
}

impl Tenant {
    async fn new(url: &str, manager: &ManagerProcess, id: &str) -> Self {
        Self {
            key: key(url, id, Role::Client).await,
            runs: RunServiceClient::new(manager.channel().await),
        }
    }

    async fn create(&mut self, prompt: &str) -> String {
        self.runs
            .create_run(with_key(&self.key, run_request(prompt)))
            .await
            .expect("create run")
            .into_inner()
            .run
            .expect("run")
            .run_id
    }

    async fn get(&mut self, run_id: &str) -> proto::Run {
        self.runs
            .get_run(with_key(
                &self.key,
                proto::GetRunRequest {
                    run_id: run_id.into(),
                },
            ))
            .await
            .expect("get run")
            .into_inner()
            .run
            .expect("run")
    }

    async fn wait_for(&mut self, run_id: &str, what: &str, done: impl Fn(&proto::Run) -> bool) {
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            let run = self.get(run_id).await;
            if done(&run) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run_id} never {what}: {run:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Stored delta rows of a run.
async fn stored_deltas(db: &tokio_postgres::Client, run_id: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM events WHERE run_id = $1::text::uuid AND type = 'content.delta'",
        &[&run_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// With authentication on, a tenant's own retention applies to its runs only: another
/// tenant's run that ended earlier, under the manager's default of an hour, and the
/// tenant's own run still streaming are untouched when its ended run is compacted.
#[tokio::test]
async fn a_tenants_retention_applies_to_its_ended_runs_only() {
    let url = fresh_database().await;
    let manager = ManagerProcess::start(
        &url,
        &[
            ("AGENTRUN_AUTH", "required"),
            ("AGENTRUN_EVENT_RETENTION_MS", "3600000"),
            ("AGENTRUN_EVENT_COMPACTION_INTERVAL_MS", "50"),
        ],
    )
    .await;
    let db = db_client(&url).await;
    let admin_key = key(&url, "ops", Role::Admin).await;
    let mut admin = AdminServiceClient::new(manager.channel().await);
    let mut alpha = Tenant::new(&url, &manager, "alpha").await;
    let mut beta = Tenant::new(&url, &manager, "beta").await;

    // alpha's live run: a slow runner with one slot streams into it for minutes.
    let alpha_runner_key = key(&url, "alpha", Role::Runner).await;
    let _slow = RunnerProcess::start(
        manager.addr,
        "alpha-slow",
        &[
            ("AGENTRUN_API_KEY", &alpha_runner_key),
            ("AGENTRUN_MAX_CONCURRENCY", "1"),
            ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "200"),
        ],
    );
    let live = alpha.create("[tokens:1000] a long story").await;
    wait_for("the live run to stream", LONG, || async {
        (stored_deltas(&db, &live).await > 1).then_some(())
    })
    .await;

    // beta's run ends first, then alpha's.
    let beta_runner_key = key(&url, "beta", Role::Runner).await;
    let fast = [("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "0")];
    let _beta_runner = RunnerProcess::start(
        manager.addr,
        "beta",
        &[("AGENTRUN_API_KEY", &beta_runner_key), fast[0]],
    );
    let beta_run = beta.create("[tokens:100] beta's reply").await;
    beta.wait_for(&beta_run, "completed", |r| {
        status_of(r) == RunStatus::Completed
    })
    .await;
    let _alpha_runner = RunnerProcess::start(
        manager.addr,
        "alpha-fast",
        &[("AGENTRUN_API_KEY", &alpha_runner_key), fast[0]],
    );
    let alpha_run = alpha.create("[tokens:100] alpha's reply").await;
    alpha
        .wait_for(&alpha_run, "completed", |r| {
            status_of(r) == RunStatus::Completed
        })
        .await;
    let beta_deltas = stored_deltas(&db, &beta_run).await;
    assert!(beta_deltas > 1);

    admin
        .set_tenant_retention(with_key(
            &admin_key,
            proto::SetTenantRetentionRequest {
                tenant_id: "alpha".into(),
                event_retention_ms: Some(200),
            },
        ))
        .await
        .expect("set alpha's retention");
    alpha
        .wait_for(&alpha_run, "compacted", |r| r.events_compacted_at.is_some())
        .await;
    assert_eq!(stored_deltas(&db, &alpha_run).await, 1);

    // The pass that took alpha's run saw beta's, which ended earlier: beta keeps the
    // default hour. alpha's live run is not ended, whatever its tenant's retention.
    let beta_now = beta.get(&beta_run).await;
    assert!(beta_now.events_compacted_at.is_none());
    assert_eq!(stored_deltas(&db, &beta_run).await, beta_deltas);
    let live_now = alpha.get(&live).await;
    assert_eq!(status_of(&live_now), RunStatus::Running);
    assert!(live_now.events_compacted_at.is_none());
    // Counted with its counter in one snapshot: the run goes on streaming meanwhile.
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM events WHERE run_id = r.id), r.last_event_seq
             FROM runs r WHERE r.id = $1::text::uuid",
            &[&live],
        )
        .await
        .unwrap();
    let (stored, last_seq): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(stored, last_seq, "the live run is whole");

    // The statistics say which retention each active tenant has.
    let stats = admin
        .get_queue_stats(with_key(&admin_key, proto::GetQueueStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let alpha_stats = stats
        .tenants
        .iter()
        .find(|t| t.tenant_id == "alpha")
        .expect("alpha has an active run");
    assert_eq!(alpha_stats.event_retention_ms, 200);
    assert_event_log_consistent(&db).await;
}

/// `(tenant, max_active_runs, event_retention_ms)` of every tenant_limits row.
async fn tenant_settings(db: &tokio_postgres::Client) -> Vec<(String, Option<i32>, Option<i64>)> {
    db.query(
        "SELECT tenant_id, max_active_runs, event_retention_ms FROM tenant_limits
         ORDER BY tenant_id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Bad retentions are INVALID_ARGUMENT naming the field and change nothing; clearing a
/// tenant's retention or its limit leaves the other setting alone.
#[tokio::test]
async fn bad_retentions_are_refused_and_the_settings_are_independent() {
    let mut app = TestApp::spawn_with(|s| s.event_retention_ms = 5_000).await;
    let db = app.db().await;
    for (tenant, ms, field) in [
        ("acme", Some(-1), "event_retention_ms"),
        ("acme", Some(MAX_RETENTION_MS + 1), "event_retention_ms"),
        ("acme", Some(i64::MIN), "event_retention_ms"),
        ("", Some(1_000), "tenant_id"),
        ("two words", Some(1_000), "tenant_id"),
    ] {
        let err = app
            .admin
            .set_tenant_retention(proto::SetTenantRetentionRequest {
                tenant_id: tenant.into(),
                event_retention_ms: ms,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{tenant:?} {ms:?}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    assert_eq!(tenant_settings(&db).await, vec![]);

    set_retention(&mut app.admin, "acme", Some(MAX_RETENTION_MS)).await;
    app.admin
        .set_tenant_limit(proto::SetTenantLimitRequest {
            tenant_id: "acme".into(),
            max_active_runs: 3,
        })
        .await
        .unwrap();
    assert_eq!(
        tenant_settings(&db).await,
        vec![("acme".into(), Some(3), Some(MAX_RETENTION_MS))]
    );
    // Removing the limit keeps the retention; keeping forever (0) is a setting of its own.
    app.admin
        .set_tenant_limit(proto::SetTenantLimitRequest {
            tenant_id: "acme".into(),
            max_active_runs: 0,
        })
        .await
        .unwrap();
    set_retention(&mut app.admin, "acme", Some(0)).await;
    assert_eq!(
        tenant_settings(&db).await,
        vec![("acme".into(), None, Some(0))]
    );
    // Unset: the tenant follows the manager's default again.
    set_retention(&mut app.admin, "acme", None).await;
    assert_eq!(
        tenant_settings(&db).await,
        vec![("acme".into(), None, None)]
    );
    let _run = app
        .runs
        .create_run(as_tenant("acme", run_request("hello")))
        .await
        .unwrap();
    let stats = app
        .admin
        .get_queue_stats(proto::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let acme = stats
        .tenants
        .iter()
        .find(|t| t.tenant_id == "acme")
        .unwrap();
    assert_eq!(acme.event_retention_ms, 5_000, "the manager's default");
}

/// A compaction in progress — stuck here on a row lock the test holds on one due run's
/// deltas, with the run locks of its batch held — holds up no append, claim, creation
/// or read of other runs; released, it finishes every run exactly.
#[tokio::test]
async fn a_compaction_in_progress_holds_up_no_append() {
    const RUNS: usize = 40;
    const DELTAS: usize = 100;
    let mut app = app().await;
    let texts: Vec<String> = (0..DELTAS).map(|i| format!("token {i} ")).collect();
    let ended = completed_runs(&mut app, RUNS, &texts).await;

    // The first run due (the oldest ended) is in the compactor's first batch.
    let mut blocker = app.db().await;
    let hold = blocker.transaction().await.unwrap();
    hold.query(
        "SELECT 1 FROM events WHERE run_id = $1::text::uuid AND type = 'content.delta' FOR UPDATE",
        &[&ended[0]],
    )
    .await
    .unwrap();
    set_retention(&mut app.admin, "default", Some(1)).await;
    let db = app.db().await;
    wait_for("the compactor to wait on the held rows", LONG, || async {
        let row = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE 'WITH logged AS%'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) > 0).then_some(())
    })
    .await;

    // Meanwhile a runner writes to a live run, and new runs are created and claimed.
    let me = runner("live-writer");
    let live_id = create(&mut app, "live").await;
    let live = claim(&mut app, &me, 1).await.remove(0);
    assert_eq!(live.run.as_ref().unwrap().run_id, live_id);
    for batch in 0..20 {
        tokio::time::timeout(
            LONG,
            app.runners.append_events(append(
                &me,
                &live,
                item_deltas(batch * 10 + 1, "live", &texts[..10]),
            )),
        )
        .await
        .expect("an append completes while a compaction is in progress")
        .expect("append accepted");
    }
    let listed = events_of(&mut app, &ended[1]).await;
    assert!(listed.iter().any(is_delta));
    let still: i64 = db
        .query_one(
            "SELECT count(*) FROM runs WHERE events_compacted_at IS NOT NULL AND id = $1::text::uuid",
            &[&ended[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 0, "the held run's compaction is still in progress");

    hold.rollback().await.unwrap();
    wait_compacted(&db, &ended).await;
    for run_id in &ended {
        let events = events_of(&mut app, run_id).await;
        let deltas: Vec<&proto::Event> = events.iter().filter(|e| is_delta(e)).collect();
        assert_eq!(deltas.len(), 1, "run {run_id}");
        assert_eq!(payload(deltas[0])["compacted_deltas"], DELTAS);
        assert_eq!(assistant_text(&events), texts.concat());
    }
    assert_event_log_consistent(&db).await;
}

/// Two replicas compacting the same runs at once: each run is compacted by exactly one
/// (their counters add up to the runs and the deltas removed), and every reply is whole.
#[tokio::test]
async fn two_replicas_compact_each_run_once() {
    const RUNS: usize = 60;
    const DELTAS: usize = 50;
    let fast = |s: &mut agentrun_manager::Settings| {
        s.event_compaction_interval_ms = 20;
        s.lease_ttl_ms = 120_000;
        s.metrics_listen = "127.0.0.1:0".into();
    };
    let mut a = TestApp::spawn_with(fast).await;
    let b = TestApp::spawn_on(&a.database_url, fast).await;
    let texts: Vec<String> = (0..DELTAS).map(|i| format!("word{i} ")).collect();
    let ended = completed_runs(&mut a, RUNS, &texts).await;

    set_retention(&mut a.admin, "default", Some(1)).await;
    let db = a.db().await;
    wait_compacted(&db, &ended).await;

    let mut runs_compacted = 0.0;
    let mut deltas_compacted = 0.0;
    for replica in [&a, &b] {
        let metrics = scrape(replica.metrics_addr.expect("metrics served")).await;
        runs_compacted += sample(&metrics, "agentrun_runs_compacted_total", &[]);
        deltas_compacted += sample(&metrics, "agentrun_deltas_compacted_total", &[]);
    }
    assert_eq!(runs_compacted, RUNS as f64);
    assert_eq!(deltas_compacted, (RUNS * (DELTAS - 1)) as f64);
    for run_id in &ended {
        let events = events_of(&mut a, run_id).await;
        assert_eq!(assistant_text(&events), texts.concat(), "run {run_id}");
        let merged: Vec<Value> = events.iter().filter(|e| is_delta(e)).map(payload).collect();
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0]["compacted_deltas"], DELTAS);
    }
    assert_event_log_consistent(&db).await;
}

/// Runner rows do not pile up: a runner gets a new id per process by default, so an
/// autoscaled fleet leaves a row behind for every pod it ever ran. The compactor forgets
/// the runners not seen for a day; one seen since, and one connected now, stay.
#[tokio::test]
async fn runners_gone_for_a_day_are_forgotten() {
    let mut app = app().await;
    // A claim that finds nothing still records its runner as seen.
    app.runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(runner("connected")),
            max_runs: 1,
        })
        .await
        .expect("claim");
    let db = app.db().await;
    db.batch_execute(
        "INSERT INTO runners (id, name, last_heartbeat_at, connected_at)
         VALUES ('00000000-0000-4000-8000-000000000001', 'gone', now() - interval '25 hours',
                 now() - interval '26 hours'),
                ('00000000-0000-4000-8000-000000000002', 'recent', now() - interval '23 hours',
                 now() - interval '26 hours')",
    )
    .await
    .expect("seed runners seen long ago");
    wait_for(
        "the runner gone for a day to be forgotten",
        LONG,
        || async {
            let gone: i64 = db
                .query_one("SELECT count(*) FROM runners WHERE name = 'gone'", &[])
                .await
                .unwrap()
                .get(0);
            (gone == 0).then_some(())
        },
    )
    .await;
    let left: Vec<String> = db
        .query("SELECT name FROM runners ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, ["connected", "recent"]);
}
