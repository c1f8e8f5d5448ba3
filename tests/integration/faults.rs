//! The fault-injection suite: real manager and runner processes, a real PostgreSQL, and
//! faults done for real — SIGKILL, SIGSTOP/SIGCONT, a stopped database, connections
//! reset or stalled by a TCP proxy, batches resent, reordered and left unacknowledged.
//! Every test ends with [`assert_invariants`] over the whole database (every run ended
//! or legitimately pending, gapless seq, nothing stored twice, fencing, attempts within
//! bounds, nothing completed after a cancel, every acknowledged event stored).
//!
//! | test | fault |
//! |---|---|
//! | `runners_sigkilled_mid_turn_again_and_again_lose_nothing` | runner SIGKILL under load, repeatedly |
//! | `a_run_requeued_after_its_last_turn_ended_ends_as_that_turn_left_it` | runner lost between its last turn's report and the finish |
//! | `a_runner_frozen_past_its_lease_is_fenced_when_it_wakes` | runner SIGSTOP past its lease, SIGCONT |
//! | `a_sigkilled_manager_restarts_while_runners_stream_and_clients_watch` | manager SIGKILL + restart |
//! | `two_replicas_one_sigkilled_the_other_carries_on` | one of two replicas SIGKILLed |
//! | `a_sigtermed_manager_hands_its_runners_to_another_replica` | replica SIGTERM (drain) |
//! | `postgres_stopped_and_restarted_under_load` | PostgreSQL down and back |
//! | `runner_connections_cut_stalled_and_refused_lose_nothing` | runner↔manager network |
//! | `a_watch_cut_midstream_resumes_without_gap_or_duplicate` | client↔manager network |
//! | `duplicate_reordered_and_unacknowledged_batches_on_the_stream` | resends, reordering, lost acks |
//! | `a_resent_unary_batch_is_stored_once` | the same over unary `AppendEvents` |
//! | `the_invariant_check_catches_a_corrupted_database` | the check itself can fail |
//!
//! The soak (`soak.rs`) mixes these faults over thousands of runs. The abuse section
//! ([`abuse`]) turns to hostile callers: floods, stalled readers, idle sockets, revoked keys.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentrun_manager::local_postgres::LocalPostgres;
use agentrun_shared::proto::manager_message::Body as FromManager;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_message::Body as ToManager;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::invariants::{
    Acked, Settled, assert_invariants, invariant_violations, wait_all_terminal,
};
use agentrun_tests::proxy::Proxy;
use agentrun_tests::*;
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

mod abuse;

/// The deadline of every wait: generous, the machine is small and shared.
pub(crate) const LONG: Duration = Duration::from_secs(60);

// ---- shared pieces (also used by the soak) ------------------------------------------

/// A lazily connecting channel: it reconnects by itself after the peer went away.
pub(crate) fn lazy_channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect_lazy()
}

/// A run request for the scripted profile that may be retried `max_attempts` times.
pub(crate) fn scripted(prompt: &str, max_attempts: i32) -> proto::CreateRunRequest {
    proto::CreateRunRequest {
        max_attempts,
        ..run_request(prompt)
    }
}

/// Creates the runs in one call; returns their ids.
pub(crate) async fn create_all(
    client: &mut RunServiceClient<Channel>,
    runs: Vec<proto::CreateRunRequest>,
) -> Vec<String> {
    client
        .create_runs(proto::CreateRunsRequest { runs })
        .await
        .expect("create runs")
        .into_inner()
        .runs
        .into_iter()
        .map(|r| r.run.expect("a created run").run_id)
        .collect()
}

/// A runner process that the test kills and starts again. Every start gets a runner id
/// the test knows (a new one each time, or the same one when `stable`: a restarted
/// runner with a stable id takes its runs back at once instead of waiting for their
/// leases to expire).
pub(crate) struct Restartable {
    name: String,
    target: SocketAddr,
    env: Vec<(String, String)>,
    stable: bool,
    /// The runner id of the current process.
    pub id: String,
    process: RunnerProcess,
}

impl Restartable {
    pub(crate) fn start(
        target: SocketAddr,
        name: &str,
        env: &[(&str, &str)],
        stable: bool,
    ) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let id = Uuid::new_v4().to_string();
        let process = Self::spawn(target, name, &env, &id);
        Self {
            name: name.to_owned(),
            target,
            env,
            stable,
            id,
            process,
        }
    }

    fn spawn(target: SocketAddr, name: &str, env: &[(String, String)], id: &str) -> RunnerProcess {
        let mut all: Vec<(&str, &str)> = vec![
            ("AGENTRUN_RUNNER_ID", id),
            // Reconnect quickly: the faults are short.
            ("AGENTRUN_MAX_BACKOFF_MS", "300"),
        ];
        all.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        RunnerProcess::start(target, name, &all)
    }

    pub(crate) fn signal(&self, signal: i32) {
        self.process.signal(signal);
    }

    /// SIGKILL, wait for the process to be gone, start it again.
    pub(crate) async fn kill_and_restart(&mut self) {
        self.process.signal(libc::SIGKILL);
        self.process.wait_exit(LONG).await;
        if !self.stable {
            self.id = Uuid::new_v4().to_string();
        }
        self.process = Self::spawn(self.target, &self.name, &self.env, &self.id);
    }
}

/// Every run's status, failure kind and message, attempt and epoch (for failure messages).
pub(crate) async fn outcomes(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT id::text || ' ' || status || ' ' || coalesce(failure_kind, '') || ' '
                || coalesce(failure_message, '') || ' attempt ' || attempt || ' epoch ' || lease_epoch
         FROM runs ORDER BY id",
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .unwrap_or_default()
}

/// The lifecycle events of failed runs, for failure messages.
pub(crate) async fn failed_timelines(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT e.run_id::text || ' ' || e.seq || ' ' || e.type || ' ' || to_char(e.created_at, 'HH24:MI:SS.MS')
                || ' ' || coalesce(e.payload->>'runner_name', '') || ' ' || coalesce(e.payload->>'reason', '')
         FROM events e JOIN runs r ON r.id = e.run_id
         WHERE r.status = 'failed' AND e.type IN ('run.claimed', 'run.requeued', 'run.started', 'run.terminal')
         ORDER BY e.run_id, e.seq",
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .unwrap_or_default()
}

/// Runner ids holding running runs, with how many each holds.
pub(crate) async fn running_by_runner(db: &tokio_postgres::Client) -> Vec<(String, i64)> {
    db.query(
        "SELECT lease_runner_id::text, count(*) FROM runs
         WHERE status = 'running' AND lease_runner_id IS NOT NULL GROUP BY 1 ORDER BY 2 DESC",
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

/// Content deltas stored so far, over all runs.
pub(crate) async fn deltas_stored(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM events WHERE type = 'content.delta'",
        &[],
    )
    .await
    .map_or(0, |r| r.get(0))
}

/// Waits until `n` more content deltas than `since` are stored: the load is moving.
pub(crate) async fn wait_for_progress(db: &tokio_postgres::Client, since: i64, n: i64) -> i64 {
    wait_for(
        &format!("{n} more deltas after {since}"),
        LONG,
        || async move {
            let now = deltas_stored(db).await;
            (now >= since + n).then_some(now)
        },
    )
    .await
}

/// Every completed run whose prompt is a `[tokens:N]` cue streamed, under the lease
/// epoch that completed it, exactly `token1 token2 … tokenN`: a run moved between
/// runners, managers or connections still ends with its whole reply, once. Returns how
/// many runs were checked. The reply is its stored deltas, merged or not (`deltas` and
/// `coalesced` runs), or the text of its completed assistant message (`final` runs,
/// which store no delta unless the text did not fit the message).
pub(crate) async fn assert_replies_whole(db: &tokio_postgres::Client) -> usize {
    let rows = db
        .query(
            "SELECT r.id::text, r.input->>'prompt',
                    CASE WHEN r.stream_mode = 'final' AND count(e.seq) = 0
                         THEN coalesce((SELECT c.payload->>'text' FROM events c
                                        WHERE c.run_id = r.id AND c.type = 'item.completed'
                                          AND c.payload->>'kind' = 'assistant_message'
                                        ORDER BY c.seq DESC LIMIT 1), '')
                         ELSE coalesce(string_agg(e.payload->>'delta', '' ORDER BY e.seq), '')
                    END
             FROM runs r
             LEFT JOIN events e ON e.run_id = r.id AND e.type = 'content.delta'
                  AND e.payload->>'kind' = 'assistant_text'
                  AND e.epoch = (SELECT max(epoch) FROM events x
                                 WHERE x.run_id = r.id AND x.producer = 'runner')
             WHERE r.status = 'completed'
             GROUP BY r.id, r.input, r.stream_mode",
            &[],
        )
        .await
        .expect("read the replies");
    let mut checked = 0;
    for row in rows {
        let prompt: Option<String> = row.get(1);
        let Some(n) = prompt.as_deref().and_then(tokens_cue) else {
            continue;
        };
        let want: Vec<String> = (1..=n).map(|i| format!("token{i}")).collect();
        let text: String = row.get(2);
        assert_eq!(
            text,
            want.join(" "),
            "run {} did not end with its whole reply",
            row.get::<_, String>(0)
        );
        checked += 1;
    }
    checked
}

/// The N of a `[tokens:N]` prompt that has no cue taking precedence.
fn tokens_cue(prompt: &str) -> Option<usize> {
    if ["[stall]", "[fail]", "[approval]"]
        .iter()
        .any(|c| prompt.contains(c))
    {
        return None;
    }
    let rest = &prompt[prompt.find("[tokens:")? + "[tokens:".len()..];
    rest[..rest.find(']')?].trim().parse().ok()
}

/// Follows a run with WatchRun until `run.terminal`, reconnecting with the last seq it
/// saw whenever the stream breaks (as `agentrun follow` does), to the next of
/// `channels` in turn (several manager replicas). Returns every event received and how
/// many times it reconnected. `seen` counts events as they arrive.
pub(crate) async fn watch_resuming(
    channels: Vec<Channel>,
    run_id: String,
    seen: Arc<AtomicUsize>,
) -> (Vec<proto::Event>, usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut events: Vec<proto::Event> = Vec::new();
    let mut reconnects = 0;
    loop {
        let after_seq = events.last().map_or(0, |e| e.seq);
        let mut client = RunServiceClient::new(channels[reconnects % channels.len()].clone());
        let request = proto::WatchRunRequest {
            run_id: run_id.clone(),
            after_seq,
        };
        if let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(10), client.watch_run(request)).await
        {
            let mut stream = response.into_inner();
            loop {
                let next = tokio::time::timeout_at(deadline.into(), stream.message())
                    .await
                    .unwrap_or_else(|_| panic!("run {run_id} not watched to its end in time"));
                match next {
                    Ok(Some(event)) => {
                        let terminal = event.r#type == "run.terminal";
                        events.push(event);
                        seen.fetch_add(1, Ordering::SeqCst);
                        if terminal {
                            return (events, reconnects);
                        }
                    }
                    // Broken, or ended before run.terminal (a manager going away).
                    Ok(None) | Err(_) => break,
                }
            }
        }
        reconnects += 1;
        assert!(
            Instant::now() < deadline,
            "run {run_id}: the watch could not reconnect in time"
        );
        // Pacing between reconnection attempts, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a resuming watcher received is the run's log exactly: every seq once, in order,
/// nothing missing, the same types and payloads as stored.
pub(crate) async fn assert_watched_exactly(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    watched: &[proto::Event],
) {
    let seqs: Vec<i64> = watched.iter().map(|e| e.seq).collect();
    let want: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(
        seqs, want,
        "run {run_id}: a gap or a duplicate in the watch"
    );
    let mut stored = Vec::new();
    loop {
        let page = client
            .list_events(proto::ListEventsRequest {
                run_id: run_id.into(),
                after_seq: stored.last().map_or(0, |e: &proto::Event| e.seq),
                limit: 1000,
            })
            .await
            .expect("list events")
            .into_inner()
            .events;
        let done = page.len() < 1000;
        stored.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(
        stored.len(),
        watched.len(),
        "run {run_id}: watched != stored"
    );
    for (w, s) in watched.iter().zip(&stored) {
        let parse = |e: &proto::Event| serde_json::from_str::<Value>(&e.payload_json).ok();
        assert_eq!(
            (w.seq, &w.r#type, parse(w)),
            (s.seq, &s.r#type, parse(s)),
            "run {run_id}: the watch delivered something other than what is stored"
        );
    }
}

fn message(body: ToManager) -> proto::RunnerMessage {
    proto::RunnerMessage { body: Some(body) }
}

/// Runner events with runner_seq `from..=to`.
fn batch(lease: &proto::LeaseRef, runner_id: &str, from: i64, to: i64) -> ToManager {
    ToManager::Events(proto::AppendEventsRequest {
        runner_id: runner_id.into(),
        run_id: lease.run_id.clone(),
        epoch: lease.epoch,
        events: deltas(from, to),
        command_updates: vec![],
    })
}

fn finish_completed(lease: &proto::LeaseRef, runner_id: &str) -> ToManager {
    finish_through(lease, runner_id, 0)
}

/// A completed finish that must not overtake events up to `last_runner_seq` (0: no check).
pub(crate) fn finish_through(
    lease: &proto::LeaseRef,
    runner_id: &str,
    last_runner_seq: i64,
) -> ToManager {
    ToManager::Finish(proto::FinishRunRequest {
        runner_id: runner_id.into(),
        run_id: lease.run_id.clone(),
        epoch: lease.epoch,
        status: RunStatus::Completed as i32,
        last_runner_seq,
        ..Default::default()
    })
}

/// A runner driven by hand on the Connect stream: the test decides what is sent,
/// resent, reordered or abandoned before its acknowledgement.
pub(crate) struct RawRunner {
    pub identity: proto::RunnerIdentity,
    tx: mpsc::Sender<proto::RunnerMessage>,
    inbound: tonic::Streaming<proto::ManagerMessage>,
    pub welcome: proto::Welcome,
}

impl RawRunner {
    /// Opens a stream, says hello naming `held`, reads the welcome.
    pub(crate) async fn connect(
        channel: Channel,
        identity: &proto::RunnerIdentity,
        held: &[proto::LeaseRef],
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(256);
        tx.send(message(ToManager::Hello(proto::Hello {
            runner: Some(identity.clone()),
            held_leases: held.to_vec(),
        })))
        .await
        .expect("queue the hello");
        let mut inbound = RunnerServiceClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let welcome = match inbound.message().await? {
            Some(proto::ManagerMessage {
                body: Some(FromManager::Welcome(welcome)),
            }) => welcome,
            other => panic!("expected a welcome, got {other:?}"),
        };
        Ok(Self {
            identity: identity.clone(),
            tx,
            inbound,
            welcome,
        })
    }

    /// [`Self::connect`], retried until a manager at `addr` answers (it may be
    /// restarting, or its database may be coming back).
    pub(crate) async fn reconnect(
        addr: SocketAddr,
        identity: &proto::RunnerIdentity,
        held: &[proto::LeaseRef],
    ) -> Self {
        let channel = lazy_channel(addr);
        wait_for("a manager to welcome the runner back", LONG, || {
            let channel = channel.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    Self::connect(channel, identity, held),
                )
                .await
                .ok()?
                .ok()
            }
        })
        .await
    }

    pub(crate) async fn send(&self, body: ToManager) {
        self.tx
            .send(message(body))
            .await
            .expect("the stream is open");
    }

    /// The next message other than a heartbeat response.
    pub(crate) async fn next(&mut self) -> FromManager {
        loop {
            let message = tokio::time::timeout(LONG, self.inbound.message())
                .await
                .expect("a message from the manager in time")
                .expect("the stream is healthy")
                .expect("the stream is open");
            match message.body {
                Some(FromManager::Heartbeat(_)) | None => continue,
                Some(body) => return body,
            }
        }
    }

    /// Gives one slot of credit and returns the lease of the run assigned.
    pub(crate) async fn take_one(&mut self) -> proto::LeaseRef {
        self.send(ToManager::Credit(proto::Credit { slots: 1 }))
            .await;
        match self.next().await {
            FromManager::Assignment(a) => proto::LeaseRef {
                run_id: a.run.expect("an assigned run").run_id,
                epoch: a.epoch,
            },
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    /// Sends `from..=to` and waits for the acknowledgement.
    pub(crate) async fn append(
        &mut self,
        lease: &proto::LeaseRef,
        from: i64,
        to: i64,
    ) -> proto::AppendEventsResponse {
        let runner_id = self.identity.runner_id.clone();
        self.send(batch(lease, &runner_id, from, to)).await;
        match self.next().await {
            FromManager::EventAck(ack) => {
                assert_eq!(
                    (ack.run_id.as_str(), ack.epoch),
                    (lease.run_id.as_str(), lease.epoch)
                );
                ack.result.expect("an ack carries its result")
            }
            other => panic!("expected an ack for {from}..={to}, got {other:?}"),
        }
    }

    /// Sends `from..=to` and expects it refused; returns the refusal.
    pub(crate) async fn append_refused(
        &mut self,
        lease: &proto::LeaseRef,
        events: Vec<proto::RunnerEvent>,
    ) -> proto::StreamError {
        self.send(ToManager::Events(proto::AppendEventsRequest {
            runner_id: self.identity.runner_id.clone(),
            run_id: lease.run_id.clone(),
            epoch: lease.epoch,
            events,
            command_updates: vec![],
        }))
        .await;
        match self.next().await {
            FromManager::Error(error) => error,
            other => panic!("expected the batch refused, got {other:?}"),
        }
    }

    /// Streams batches of five deltas from `runner_seq` on, each after the previous
    /// one's acknowledgement, heartbeating its lease, until the stream breaks (the
    /// fault). Records every acknowledgement in `acks`; returns the last runner_seq sent.
    pub(crate) async fn stream_until_broken(
        mut self,
        lease: &proto::LeaseRef,
        mut runner_seq: i64,
        acks: &std::sync::Mutex<Vec<Acked>>,
    ) -> i64 {
        let runner_id = self.identity.runner_id.clone();
        let mut last_beat = Instant::now();
        loop {
            // Heartbeat as a real runner does, so that only the fault can cost the lease.
            if last_beat.elapsed() >= Duration::from_millis(300) {
                last_beat = Instant::now();
                let beat = ToManager::Heartbeat(proto::HeartbeatRequest {
                    runner_id: runner_id.clone(),
                    leases: vec![lease.clone()],
                });
                if self.tx.send(message(beat)).await.is_err() {
                    return runner_seq;
                }
            }
            let sent = self
                .tx
                .send(message(batch(
                    lease,
                    &runner_id,
                    runner_seq + 1,
                    runner_seq + 5,
                )))
                .await;
            if sent.is_err() {
                return runner_seq;
            }
            runner_seq += 5;
            let acked = loop {
                match tokio::time::timeout(Duration::from_secs(30), self.inbound.message()).await {
                    Ok(Ok(Some(proto::ManagerMessage {
                        body: Some(FromManager::EventAck(ack)),
                    }))) => break ack,
                    Ok(Ok(Some(proto::ManagerMessage {
                        body: Some(FromManager::Error(error)),
                    }))) => panic!("a healthy batch was refused: {error:?}"),
                    Ok(Ok(Some(_))) => continue,
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return runner_seq,
                }
            };
            acks.lock()
                .expect("acks lock")
                .push(Acked::from_ack(&acked));
            // Paced like a provider streaming tokens.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// After the stream of `lease` broke with `last_sent` sent: reconnect to `addr` naming
/// the lease as a real runner would, check the manager kept everything it had
/// acknowledged, resend what is missing and finish the run. If the lease did not survive
/// (it expired meanwhile), take the run again (new epoch) and finish it there.
pub(crate) async fn resume_and_finish(
    addr: SocketAddr,
    identity: &proto::RunnerIdentity,
    lease: &proto::LeaseRef,
    last_sent: i64,
    acks: &std::sync::Mutex<Vec<Acked>>,
) {
    let most_acked = acks
        .lock()
        .expect("acks lock")
        .iter()
        .map(|a| a.acked_runner_seq)
        .max()
        .unwrap_or(0);
    let mut raw = RawRunner::reconnect(addr, identity, std::slice::from_ref(lease)).await;
    let resumed = raw
        .welcome
        .resumed
        .iter()
        .find(|l| l.run_id == lease.run_id)
        .cloned();
    match resumed {
        Some(resumed) => {
            assert!(
                resumed.acked_runner_seq >= most_acked,
                "the manager acknowledged runner_seq {most_acked} but after the fault holds only {}",
                resumed.acked_runner_seq
            );
            acks.lock()
                .expect("acks lock")
                .push(Acked::from_resumed(&resumed));
            if resumed.acked_runner_seq < last_sent {
                let ack = raw
                    .append(lease, resumed.acked_runner_seq + 1, last_sent)
                    .await;
                assert_eq!(ack.acked_runner_seq, last_sent);
                acks.lock().expect("acks lock").push(Acked::new(
                    &lease.run_id,
                    lease.epoch,
                    last_sent,
                ));
            }
            let runner_id = identity.runner_id.clone();
            raw.send(finish_completed(lease, &runner_id)).await;
            match raw.next().await {
                FromManager::FinishAck(ack) => assert_eq!(ack.status, RunStatus::Completed as i32),
                other => panic!("expected the finish acknowledged, got {other:?}"),
            }
        }
        None => {
            assert!(
                raw.welcome.lost.iter().any(|l| l.run_id == lease.run_id),
                "a named lease is either resumed or lost: {:?}",
                raw.welcome
            );
            let again = raw.take_one().await;
            assert_eq!(
                again.run_id, lease.run_id,
                "only this runner serves the run"
            );
            assert!(again.epoch > lease.epoch);
            let ack = raw.append(&again, 1, 3).await;
            acks.lock().expect("acks lock").push(Acked::new(
                &again.run_id,
                again.epoch,
                ack.acked_runner_seq,
            ));
            let runner_id = identity.runner_id.clone();
            raw.send(finish_completed(&again, &runner_id)).await;
            match raw.next().await {
                FromManager::FinishAck(ack) => assert_eq!(ack.status, RunStatus::Completed as i32),
                other => panic!("expected the finish acknowledged, got {other:?}"),
            }
        }
    }
}

/// A runner identity only it serves: runs labelled `label` go to it alone.
/// A hand-driven runner serving only `label`'s queue: it can never take one of the
/// scripted runners' runs (on the default queue) in place of its own.
fn raw_identity(label: &str) -> proto::RunnerIdentity {
    let mut identity = runner("raw");
    identity.labels = vec![label.into()];
    identity.queues = vec![label.into()];
    identity
}

/// A run only [`raw_identity`]`(label)` can take.
fn labelled(prompt: &str, label: &str) -> proto::CreateRunRequest {
    proto::CreateRunRequest {
        labels: vec![label.into()],
        queue: label.into(),
        ..run_request(prompt)
    }
}

/// A watcher's task: the run it follows, and what it received and how often it reconnected.
type Watcher = (String, tokio::task::JoinHandle<(Vec<proto::Event>, usize)>);

/// Starts a resuming watcher per run, on `channels` (tried in turn).
fn watch_all(channels: &[Channel], run_ids: &[String], seen: &Arc<AtomicUsize>) -> Vec<Watcher> {
    run_ids
        .iter()
        .map(|id| {
            let watcher = tokio::spawn(watch_resuming(channels.to_vec(), id.clone(), seen.clone()));
            (id.clone(), watcher)
        })
        .collect()
}

/// Waits for every watcher; checks each saw its run's log exactly; returns the total
/// number of reconnections.
async fn check_watchers(client: &mut RunServiceClient<Channel>, watchers: Vec<Watcher>) -> usize {
    let mut reconnects = 0;
    for (run_id, watcher) in watchers {
        let (events, n) = watcher.await.expect("the watcher finished");
        assert_watched_exactly(client, &run_id, &events).await;
        reconnects += n;
    }
    reconnects
}

async fn wait_for_health(health: &HealthClient<Channel>, service: &str, want: ServingStatus) {
    wait_for(&format!("{service:?} to be {want:?}"), LONG, || async {
        let mut health = health.clone();
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?
            .into_inner()
            .status;
        (status == want as i32).then_some(())
    })
    .await
}

const SERVICES: [&str; 3] = ["", "agentrun.v1.RunService", "agentrun.v1.RunnerService"];

// ---- runners ----------------------------------------------------------------------------

#[tokio::test]
async fn runners_sigkilled_mid_turn_again_and_again_lose_nothing() {
    let url = fresh_database().await;
    let manager = ManagerProcess::start(&url, &[]).await;
    let mut client = RunServiceClient::new(manager.channel().await);
    let db = db_client(&url).await;
    let env = [
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20"),
        ("AGENTRUN_MAX_CONCURRENCY", "4"),
    ];
    // r0 keeps its id across restarts (its runs come back at once, under a new epoch);
    // the others come back as new runners (their runs wait for the lease to expire).
    let mut runners: Vec<Restartable> = (0..3)
        .map(|i| Restartable::start(manager.addr, &format!("r{i}"), &env, i == 0))
        .collect();
    let runs: Vec<_> = (0..36)
        .map(|i| scripted(&format!("[tokens:100] load {i}"), 10))
        .collect();
    let run_ids = create_all(&mut client, runs).await;

    let mut kills = 0;
    let mut progress = wait_for_progress(&db, 0, 40).await;
    while kills < 6 {
        // Kill a runner that is in the middle of turns right now.
        let holders = running_by_runner(&db).await;
        let victim = holders
            .iter()
            .find_map(|(id, _)| runners.iter().position(|r| &r.id == id));
        let Some(victim) = victim else {
            assert!(kills > 0, "no runner ever held a running run");
            break;
        };
        runners[victim].kill_and_restart().await;
        kills += 1;
        // The restarted runner is back at work (or there is no work left for it).
        let id = runners[victim].id.clone();
        wait_for("the restarted runner to take work", LONG, || {
            let (db, id) = (&db, id.clone());
            async move {
                let row = db
                    .query_one(
                        "SELECT count(*) FILTER (WHERE lease_runner_id::text = $1 AND status = 'running'),
                                count(*) FILTER (WHERE status = 'pending')
                         FROM runs",
                        &[&id],
                    )
                    .await
                    .ok()?;
                (row.get::<_, i64>(0) > 0 || row.get::<_, i64>(1) == 0).then_some(())
            }
        })
        .await;
        progress = wait_for_progress(&db, progress, 40).await;
    }

    wait_all_terminal(&db, LONG).await;
    let summary = assert_invariants(&db, Settled::AllTerminal, &[]).await;
    assert_eq!(
        summary.count(RunStatus::Completed),
        run_ids.len() as i64,
        "{summary}"
    );
    assert_eq!(assert_replies_whole(&db).await, run_ids.len());
    let moved: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT run_id FROM events WHERE type = 'run.claimed'
             GROUP BY run_id HAVING count(*) > 1) m",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(moved > 0, "the kills ({kills}) interrupted no run");
}

/// A runner that dies after reporting its last turn's command done, before the run's
/// finish is stored, leaves a requeued run with nothing left to do. The next runner ends
/// it at once as that turn left it (completed; failed with the turn's error), without
/// running the turn again, instead of holding it claimed for its idle timeout (ten
/// minutes).
#[tokio::test]
async fn a_run_requeued_after_its_last_turn_ended_ends_as_that_turn_left_it() {
    let mut app = TestApp::spawn().await;
    let db = app.db().await;
    let states = ["completed", "failed"];
    let runs = turns_ended_then_runner_lost(&mut app, &db, &states).await;
    let _next = RunnerProcess::start(app.addr, "next", &[]);
    for (run, state) in runs.into_iter().zip(states) {
        let run_id = run.to_string();
        let want = if state == "completed" {
            RunStatus::Completed
        } else {
            RunStatus::Failed
        };
        let run = wait_for_run(&app, &run_id, want, LONG).await;
        assert_eq!(run.attempt, 2, "{state}: ended by its second lease");
        if state == "failed" {
            assert_eq!(run.failure_kind, "provider_error");
            assert!(
                run.failure_message.contains("the model said no"),
                "{}",
                run.failure_message
            );
        }
        let types = event_types(&mut app, &run_id).await;
        assert_eq!(
            types.iter().filter(|t| *t == "turn.started").count(),
            1,
            "{state}: the ended turn is not run again: {types:?}"
        );
    }
    assert_invariants(&db, Settled::AllTerminal, &[]).await;
}

#[tokio::test]
async fn a_runner_frozen_past_its_lease_is_fenced_when_it_wakes() {
    let url = fresh_database().await;
    let manager = ManagerProcess::start(&url, &[("AGENTRUN_LEASE_TTL_MS", "1500")]).await;
    let mut client = RunServiceClient::new(manager.channel().await);
    let db = db_client(&url).await;
    let env = [
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20"),
        ("AGENTRUN_MAX_CONCURRENCY", "4"),
    ];
    let zombie = Restartable::start(manager.addr, "zombie", &env, true);
    let runs: Vec<_> = (0..4)
        .map(|i| scripted(&format!("[tokens:150] contested {i}"), 5))
        .collect();
    let run_ids = create_all(&mut client, runs).await;
    let zombie_id = Uuid::parse_str(&zombie.id).unwrap();
    wait_for("the zombie to stream all four runs", LONG, || {
        let db = &db;
        async move {
            let n: i64 = db
                .query_one(
                    "SELECT count(DISTINCT run_id) FROM events WHERE runner_id = $1 AND runner_seq >= 5",
                    &[&zombie_id],
                )
                .await
                .ok()?
                .get(0);
            (n == 4).then_some(())
        }
    })
    .await;

    // Frozen past its lease: every run is requeued, and a healthy runner takes them;
    // all but one, cancelled while its runner is frozen, which must end cancelled.
    zombie.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let (cancelled, others) = run_ids.split_last().expect("four runs");
    client
        .cancel_run(proto::CancelRunRequest {
            run_id: cancelled.clone(),
            ..Default::default()
        })
        .await
        .expect("cancel a run whose runner is frozen");
    let healthy = Restartable::start(manager.addr, "healthy", &env, false);
    let healthy_id = healthy.id.clone();
    wait_for("the healthy runner to stream the other runs", LONG, || {
        let db = &db;
        let healthy_id = healthy_id.clone();
        async move {
            let n: i64 = db
                .query_one(
                    "SELECT count(DISTINCT run_id) FROM events WHERE runner_id::text = $1 AND runner_seq >= 5",
                    &[&healthy_id],
                )
                .await
                .ok()?
                .get(0);
            (n == 3).then_some(())
        }
    })
    .await;
    assert!(
        frozen_at.elapsed() < Duration::from_secs(30),
        "the frozen runner's runs were reclaimed only after {:?}",
        frozen_at.elapsed()
    );
    // It wakes up with batches it still thinks it may send: all are refused.
    zombie.signal(libc::SIGCONT);

    wait_all_terminal(&db, LONG).await;
    // The fencing invariant: no zombie event after the requeue of its lease.
    let summary = assert_invariants(&db, Settled::AllTerminal, &[]).await;
    assert_eq!(
        (
            summary.count(RunStatus::Completed),
            summary.count(RunStatus::Cancelled)
        ),
        (3, 1),
        "{summary}: {:#?} {:#?}",
        outcomes(&db).await,
        failed_timelines(&db).await
    );
    assert_eq!(assert_replies_whole(&db).await, 3);
    let get = |run_id: &String| {
        let mut client = client.clone();
        let run_id = run_id.clone();
        async move {
            client
                .get_run(proto::GetRunRequest { run_id })
                .await
                .unwrap()
                .into_inner()
                .run
                .unwrap()
        }
    };
    for run_id in others {
        let run = get(run_id).await;
        assert_eq!(
            (status_of(&run), run.attempt),
            (RunStatus::Completed, 2),
            "requeued once, not more"
        );
    }
    let run = get(cancelled).await;
    assert_eq!(
        (status_of(&run), run.attempt),
        (RunStatus::Cancelled, 1),
        "cancelled when its lease expired, not requeued"
    );
    drop(healthy);
}

// ---- managers ---------------------------------------------------------------------------

#[tokio::test]
async fn a_sigkilled_manager_restarts_while_runners_stream_and_clients_watch() {
    let url = fresh_database().await;
    let addr = free_addr();
    // A longer lease: the restarted manager finds the leases still live, so the runners
    // resume them (the expired case is covered by the runner tests).
    let manager_env = [("AGENTRUN_LEASE_TTL_MS", "5000")];
    let mut manager = ManagerProcess::start_at(&url, addr, &manager_env).await;
    let mut client = RunServiceClient::new(lazy_channel(addr));
    let db = db_client(&url).await;
    let env = [
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10"),
        ("AGENTRUN_MAX_CONCURRENCY", "4"),
    ];
    let _runners: Vec<Restartable> = (0..2)
        .map(|i| Restartable::start(addr, &format!("r{i}"), &env, false))
        .collect();
    let runs: Vec<_> = (0..8)
        .map(|i| scripted(&format!("[tokens:200] through a crash {i}"), 5))
        .collect();
    let mut run_ids = create_all(&mut client, runs).await;
    // A hand-driven runner too, recording the acknowledgements it gets.
    let raw_run = create_all(&mut client, vec![labelled("by hand", "raw-crash")]).await;
    run_ids.extend(raw_run);
    let identity = raw_identity("raw-crash");
    let mut raw = RawRunner::connect(lazy_channel(addr), &identity, &[])
        .await
        .unwrap();
    let lease = raw.take_one().await;
    let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let streaming = {
        let (lease, acks) = (lease.clone(), acks.clone());
        tokio::spawn(async move { raw.stream_until_broken(&lease, 0, &acks).await })
    };
    let seen = Arc::new(AtomicUsize::new(0));
    let watchers = watch_all(&[lazy_channel(addr)], &run_ids, &seen);
    wait_for_progress(&db, 0, 300).await;

    manager.kill();
    let restarted_at = Instant::now();
    let manager = ManagerProcess::start_at(&url, addr, &manager_env).await;
    let last_sent = streaming.await.unwrap();
    assert!(
        !acks.lock().unwrap().is_empty(),
        "the raw runner was acknowledged before the crash"
    );
    resume_and_finish(addr, &identity, &lease, last_sent, &acks).await;

    wait_all_terminal(&db, LONG).await;
    assert!(
        restarted_at.elapsed() < Duration::from_secs(45),
        "runs took {:?} to finish after the restart",
        restarted_at.elapsed()
    );
    let acks = acks.lock().unwrap().clone();
    let summary = assert_invariants(&db, Settled::AllTerminal, &acks).await;
    assert_eq!(
        summary.count(RunStatus::Completed),
        run_ids.len() as i64,
        "{summary}"
    );
    assert_eq!(assert_replies_whole(&db).await, run_ids.len() - 1);
    let reconnects = check_watchers(&mut client, watchers).await;
    assert!(reconnects > 0, "no watcher noticed the crash");
    drop(manager);
}

#[tokio::test]
async fn two_replicas_one_sigkilled_the_other_carries_on() {
    let url = fresh_database().await;
    let (mut a, b) = tokio::join!(
        ManagerProcess::start(&url, &[]),
        ManagerProcess::start(&url, &[])
    );
    let db = db_client(&url).await;
    // The runners try A first, then B.
    let managers = format!("http://{},http://{}", a.addr, b.addr);
    let env = [
        ("AGENTRUN_MANAGER_URL", managers.as_str()),
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10"),
        ("AGENTRUN_MAX_CONCURRENCY", "4"),
    ];
    let _runners: Vec<Restartable> = (0..2)
        .map(|i| Restartable::start(a.addr, &format!("r{i}"), &env, false))
        .collect();
    let mut client_b = RunServiceClient::new(b.channel().await);
    let runs: Vec<_> = (0..8)
        .map(|i| scripted(&format!("[tokens:200] replica {i}"), 5))
        .collect();
    let run_ids = create_all(&mut client_b, runs).await;
    // Half the watchers on the replica that dies: they move to the other.
    let seen = Arc::new(AtomicUsize::new(0));
    let (to_a, to_b) = (lazy_channel(a.addr), lazy_channel(b.addr));
    let mut watchers = watch_all(std::slice::from_ref(&to_b), &run_ids[..4], &seen);
    watchers.extend(watch_all(&[to_a, to_b], &run_ids[4..], &seen));
    wait_for_progress(&db, 0, 300).await;

    a.kill();
    let killed_at = Instant::now();
    wait_all_terminal(&db, LONG).await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(45),
        "the surviving replica took {:?} to finish the runs",
        killed_at.elapsed()
    );
    let summary = assert_invariants(&db, Settled::AllTerminal, &[]).await;
    assert_eq!(
        summary.count(RunStatus::Completed),
        run_ids.len() as i64,
        "{summary}"
    );
    assert_eq!(assert_replies_whole(&db).await, run_ids.len());
    check_watchers(&mut client_b, watchers).await;
}

#[tokio::test]
async fn a_sigtermed_manager_hands_its_runners_to_another_replica() {
    let url = fresh_database().await;
    // What is tested is that the hand-over keeps the lease, so the lease must outlast a
    // reconnect on a machine busy with other tests, which the suite's 2 s need not.
    let env = [("AGENTRUN_LEASE_TTL_MS", "10000")];
    let (mut a, b) = tokio::join!(
        ManagerProcess::start(&url, &env),
        ManagerProcess::start(&url, &env)
    );
    // The runner tries A first, then B.
    let managers = format!("http://{},http://{}", a.addr, b.addr);
    let _runner = RunnerProcess::start(
        a.addr,
        "r",
        &[
            ("AGENTRUN_MANAGER_URL", managers.as_str()),
            ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10"),
            ("AGENTRUN_MAX_BACKOFF_MS", "200"),
        ],
    );
    let mut client = RunServiceClient::new(b.channel().await);
    let run_id = client
        .create_run(run_request("[tokens:300] keep streaming"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let db = db_client(&url).await;
    let run_uuid = Uuid::parse_str(&run_id).unwrap();
    wait_for_progress(&db, 0, 20).await;

    a.signal(libc::SIGTERM);
    let status = a.wait_exit(LONG).await;
    assert!(status.success(), "manager A exited {status:?}");

    wait_all_terminal(&db, LONG).await;
    let run = client
        .get_run(proto::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status_of(&run), RunStatus::Completed);
    assert_eq!(
        (run.attempt, run.lease_epoch),
        (1, 1),
        "the lease was resumed, not lost"
    );
    let deltas: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE run_id = $1 AND type = 'content.delta'",
            &[&run_uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deltas, 300, "every token stored exactly once");
    assert_invariants(&db, Settled::AllTerminal, &[]).await;
}

// ---- the database -----------------------------------------------------------------------

#[tokio::test]
async fn postgres_stopped_and_restarted_under_load() {
    // A cluster of its own: this test stops it.
    let pg = Arc::new(
        tokio::task::spawn_blocking(LocalPostgres::start)
            .await
            .unwrap()
            .expect("start a PostgreSQL for this test"),
    );
    db_client(&pg.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE agentrun_faults")
        .await
        .unwrap();
    let url = pg.url("agentrun_faults");
    let manager = ManagerProcess::start(&url, &[]).await;
    let addr = manager.addr;
    let mut client = RunServiceClient::new(lazy_channel(addr));
    let health = HealthClient::new(lazy_channel(addr));
    for service in SERVICES {
        wait_for_health(&health, service, ServingStatus::Serving).await;
    }
    let env = [
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10"),
        ("AGENTRUN_MAX_CONCURRENCY", "4"),
    ];
    let _runners: Vec<Restartable> = (0..2)
        .map(|i| Restartable::start(addr, &format!("r{i}"), &env, false))
        .collect();
    let runs: Vec<_> = (0..8)
        .map(|i| scripted(&format!("[tokens:200] through an outage {i}"), 5))
        .collect();
    let mut run_ids = create_all(&mut client, runs).await;
    run_ids.extend(create_all(&mut client, vec![labelled("by hand", "raw-pg")]).await);
    let identity = raw_identity("raw-pg");
    let mut raw = RawRunner::connect(lazy_channel(addr), &identity, &[])
        .await
        .unwrap();
    let lease = raw.take_one().await;
    let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let streaming = {
        let (lease, acks) = (lease.clone(), acks.clone());
        tokio::spawn(async move { raw.stream_until_broken(&lease, 0, &acks).await })
    };
    let db = db_client(&url).await;
    wait_for_progress(&db, 0, 300).await;
    // What clients could read before the outage must all be there after it.
    let mut before = Vec::new();
    for run_id in &run_ids {
        before.push((run_id.clone(), list_all(&mut client, run_id).await));
    }
    drop(db);

    let stopping = pg.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap()
        .expect("stop PostgreSQL");
    for service in SERVICES {
        wait_for_health(&health, service, ServingStatus::NotServing).await;
    }
    let refused = client
        .create_run(run_request("while the database is down"))
        .await
        .expect_err("no database, no run");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = client
        .get_run(proto::GetRunRequest {
            run_id: run_ids[0].clone(),
        })
        .await
        .expect_err("no database, no read");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let last_sent = streaming.await.unwrap();

    let restarting = pg.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap()
        .expect("restart PostgreSQL");
    for service in SERVICES {
        wait_for_health(&health, service, ServingStatus::Serving).await;
    }
    let after = client
        .create_run(run_request("the database is back"))
        .await
        .expect("create a run after the database came back")
        .into_inner()
        .run
        .unwrap();
    run_ids.push(after.run_id);
    resume_and_finish(addr, &identity, &lease, last_sent, &acks).await;

    let db = db_client(&url).await;
    wait_all_terminal(&db, LONG).await;
    let acks = acks.lock().unwrap().clone();
    let summary = assert_invariants(&db, Settled::AllTerminal, &acks).await;
    assert_eq!(
        summary.count(RunStatus::Completed),
        run_ids.len() as i64,
        "{summary}"
    );
    assert_eq!(assert_replies_whole(&db).await, 8);
    for (run_id, events) in before {
        let now = list_all(&mut client, &run_id).await;
        assert!(now.len() >= events.len());
        for (was, is) in events.iter().zip(&now) {
            assert_eq!(
                (was.seq, &was.r#type, &was.payload_json),
                (is.seq, &is.r#type, &is.payload_json),
                "run {run_id}: an event read before the outage changed or vanished"
            );
        }
    }
}

async fn list_all(client: &mut RunServiceClient<Channel>, run_id: &str) -> Vec<proto::Event> {
    client
        .list_events(proto::ListEventsRequest {
            run_id: run_id.into(),
            after_seq: 0,
            limit: 1000,
        })
        .await
        .expect("list events")
        .into_inner()
        .events
}

// ---- the network ------------------------------------------------------------------------

/// How long a short stall holds the bytes: well under the lease.
const SHORT_STALL: Duration = Duration::from_millis(700);

#[tokio::test]
async fn runner_connections_cut_stalled_and_refused_lose_nothing() {
    let url = fresh_database().await;
    let manager = ManagerProcess::start(&url, &[]).await;
    let proxy = Proxy::start(manager.addr).await;
    let mut client = RunServiceClient::new(manager.channel().await);
    let db = db_client(&url).await;
    let through_proxy = proxy.url();
    let env = [
        ("AGENTRUN_MANAGER_URL", through_proxy.as_str()),
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10"),
        ("AGENTRUN_MAX_CONCURRENCY", "4"),
    ];
    let _runners: Vec<Restartable> = (0..2)
        .map(|i| Restartable::start(manager.addr, &format!("behind-proxy-{i}"), &env, false))
        .collect();
    let mut wave = 0;
    let mut new_wave = async |client: &mut RunServiceClient<Channel>| {
        wave += 1;
        let runs: Vec<_> = (0..6)
            .map(|i| scripted(&format!("[tokens:150] wave {wave} run {i}"), 10))
            .collect();
        create_all(client, runs).await
    };
    let mut run_ids = new_wave(&mut client).await;

    // Cuts: the runners reconnect, name their leases and resend what was not acked.
    let mut progress = wait_for_progress(&db, 0, 100).await;
    for _ in 0..3 {
        let accepted = proxy.accepted();
        proxy.cut_all();
        wait_for("both runners to reconnect", LONG, || async {
            (proxy.accepted() >= accepted + 2).then_some(())
        })
        .await;
        progress = wait_for_progress(&db, progress, 50).await;
    }

    // A short stall: nothing is closed, the bytes just stop, then flow again.
    run_ids.extend(new_wave(&mut client).await);
    progress = wait_for_progress(&db, progress, 50).await;
    proxy.stall(true);
    tokio::time::sleep(SHORT_STALL).await;
    proxy.stall(false);
    progress = wait_for_progress(&db, progress, 50).await;

    // A stall past the lease: the runs are requeued and go to a runner with a working
    // network; when the stall ends, the stalled runners' late batches are refused.
    run_ids.extend(new_wave(&mut client).await);
    progress = wait_for_progress(&db, progress, 50).await;
    proxy.stall(true);
    let before: i64 = count_events(&db, "run.requeued").await;
    wait_for(
        "leases behind the stalled proxy to expire",
        LONG,
        || async { (count_events(&db, "run.requeued").await > before).then_some(()) },
    )
    .await;
    let direct = Restartable::start(
        manager.addr,
        "direct",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10")],
        false,
    );
    wait_for_progress(&db, progress, 50).await;
    proxy.stall(false);

    // Refused: the runners cannot get back in for a while. The direct runner is gone
    // too (its runs are requeued): only the runners behind the proxy can finish the
    // work, so they must get back in.
    run_ids.extend(new_wave(&mut client).await);
    drop(direct);
    let refused = proxy.refused();
    proxy.refuse(true);
    proxy.cut_all();
    wait_for("the runners to be refused", LONG, || async {
        (proxy.refused() >= refused + 2).then_some(())
    })
    .await;
    let accepted = proxy.accepted();
    proxy.refuse(false);
    wait_for("the runners to get back in", LONG, || async {
        (proxy.accepted() >= accepted + 2).then_some(())
    })
    .await;

    wait_all_terminal(&db, LONG).await;
    let summary = assert_invariants(&db, Settled::AllTerminal, &[]).await;
    assert_eq!(
        summary.count(RunStatus::Completed),
        run_ids.len() as i64,
        "{summary}"
    );
    assert_eq!(assert_replies_whole(&db).await, run_ids.len());
}

async fn count_events(db: &tokio_postgres::Client, event_type: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM events WHERE type = $1",
        &[&event_type],
    )
    .await
    .map_or(0, |r| r.get(0))
}

#[tokio::test]
async fn a_watch_cut_midstream_resumes_without_gap_or_duplicate() {
    let app = TestApp::spawn().await;
    let proxy = Proxy::start(app.addr).await;
    let _runner =
        RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10")]);
    let mut client = app.runs.clone();
    let run_ids = create_all(
        &mut client,
        (0..3)
            .map(|i| scripted(&format!("[tokens:300] watched {i}"), 3))
            .collect(),
    )
    .await;
    let seen = Arc::new(AtomicUsize::new(0));
    let watchers = watch_all(&[lazy_channel(proxy.addr())], &run_ids, &seen);
    let reached = |n: usize| {
        let seen = seen.clone();
        async move {
            wait_for(&format!("the watchers to receive {n} events"), LONG, || {
                let seen = seen.clone();
                async move { (seen.load(Ordering::SeqCst) >= n).then_some(()) }
            })
            .await
        }
    };

    // Each fault early enough that every watch is still streaming when it strikes
    // (about 930 events in all).
    reached(60).await;
    let refused = proxy.refused();
    proxy.refuse(true);
    proxy.cut_all();
    wait_for("a watcher to be refused", LONG, || async {
        (proxy.refused() > refused).then_some(())
    })
    .await;
    proxy.refuse(false);
    reached(200).await;
    proxy.cut_all();
    reached(350).await;
    proxy.stall(true);
    tokio::time::sleep(SHORT_STALL).await;
    proxy.stall(false);
    reached(500).await;
    proxy.cut_all();

    let reconnects = check_watchers(&mut client, watchers).await;
    assert!(reconnects >= 3, "only {reconnects} reconnections");
    let db = app.db().await;
    let summary = assert_invariants(&db, Settled::AllTerminal, &[]).await;
    assert_eq!(summary.count(RunStatus::Completed), 3, "{summary}");
}

// ---- the protocol -----------------------------------------------------------------------

/// The code name a StreamError carries, normalised (`INVALID_ARGUMENT` and
/// `InvalidArgument` alike).
fn code_name(error: &proto::StreamError) -> String {
    error.code.replace('_', "").to_ascii_lowercase()
}

#[tokio::test]
async fn duplicate_reordered_and_unacknowledged_batches_on_the_stream() {
    // A long lease: this test is about resends, not expiry.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let run_id = app
        .runs
        .create_run(run_request("by hand"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let identity = runner("raw");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .unwrap();
    let lease = raw.take_one().await;
    assert_eq!(lease.run_id, run_id);
    let mut acks = Vec::new();
    let mut acked = |ack: &proto::AppendEventsResponse| {
        acks.push(Acked::new(&run_id, lease.epoch, ack.acked_runner_seq));
    };

    let first = raw.append(&lease, 1, 5).await;
    assert_eq!((first.acked_runner_seq, first.duplicates), (5, 0));
    acked(&first);
    // The same batch again (its ack was lost): stored once.
    let again = raw.append(&lease, 1, 5).await;
    assert_eq!(
        (again.first_seq, again.duplicates, again.acked_runner_seq),
        (0, 5, 5)
    );
    // (A batch that skips ahead, or has a hole, is refused and ends its run on the
    // stream: `stream_correctness`; on the unary path: `a_resent_unary_batch_is_stored_once`.)
    let ack = raw.append(&lease, 6, 10).await;
    assert_eq!((ack.acked_runner_seq, ack.duplicates), (10, 0));
    acked(&ack);
    let ack = raw.append(&lease, 11, 15).await;
    assert_eq!((ack.acked_runner_seq, ack.duplicates), (15, 0));
    // A late duplicate of an older batch changes nothing.
    let late = raw.append(&lease, 6, 10).await;
    assert_eq!(
        (late.first_seq, late.duplicates, late.acked_runner_seq),
        (0, 5, 15)
    );
    // An overlapping batch stores only what is new.
    let overlap = raw.append(&lease, 13, 18).await;
    assert_eq!((overlap.duplicates, overlap.acked_runner_seq), (3, 18));
    assert_eq!(overlap.last_seq - overlap.first_seq, 2);
    acked(&overlap);
    // Acknowledgement lost: 19..=25 sent, the connection gone before the ack is read.
    let runner_id = identity.runner_id.clone();
    raw.send(batch(&lease, &runner_id, 19, 25)).await;
    drop(raw);
    let mut raw = RawRunner::reconnect(app.addr, &identity, std::slice::from_ref(&lease)).await;
    let resumed = raw
        .welcome
        .resumed
        .iter()
        .find(|l| l.run_id == run_id)
        .cloned()
        .expect("the lease survives a reconnect");
    assert!(
        resumed.acked_runner_seq == 18 || resumed.acked_runner_seq == 25,
        "acked {} is neither before nor after the lost batch",
        resumed.acked_runner_seq
    );
    acks.push(Acked::from_resumed(&resumed));
    // Resend the whole batch, as a runner that does not trust the welcome would.
    let resent = raw.append(&lease, 19, 25).await;
    assert_eq!(resent.acked_runner_seq, 25);
    assert_eq!(resent.duplicates as i64, resumed.acked_runner_seq - 18);
    acks.push(Acked::new(&run_id, lease.epoch, 25));

    // The events and the finish sent back to back, without waiting, and both
    // acknowledgements lost: after a reconnect whatever is missing is sent again.
    raw.send(batch(&lease, &runner_id, 26, 30)).await;
    raw.send(finish_through(&lease, &runner_id, 30)).await;
    drop(raw);
    let mut raw = RawRunner::reconnect(app.addr, &identity, std::slice::from_ref(&lease)).await;
    if let Some(resumed) = raw.welcome.resumed.iter().find(|l| l.run_id == run_id) {
        assert!(
            resumed.acked_runner_seq == 25 || resumed.acked_runner_seq == 30,
            "acked {} is neither before nor after the lost batch",
            resumed.acked_runner_seq
        );
        acks.push(Acked::from_resumed(resumed));
        let ack = raw.append(&lease, 26, 30).await;
        assert_eq!(ack.acked_runner_seq, 30);
        raw.send(finish_through(&lease, &runner_id, 30)).await;
        match raw.next().await {
            FromManager::FinishAck(ack) => assert_eq!(ack.status, RunStatus::Completed as i32),
            other => panic!("expected the resent finish acknowledged, got {other:?}"),
        }
    } else {
        // The finish was committed before the connection went: the lease is gone.
        assert!(raw.welcome.lost.iter().any(|l| l.run_id == run_id));
    }
    acks.push(Acked::new(&run_id, lease.epoch, 30));
    let run = wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    assert_eq!(run.attempt, 1);
    // Writing after the end is fenced.
    let fenced = raw.append_refused(&lease, deltas(31, 31)).await;
    assert_eq!(code_name(&fenced), "failedprecondition", "{fenced:?}");
    assert!(fenced.message.starts_with("lease_lost"), "{fenced:?}");

    let db = app.db().await;
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE run_id = $1 AND type = 'content.delta'",
            &[&Uuid::parse_str(&run_id).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 30, "every delta stored exactly once");
    assert_invariants(&db, Settled::AllTerminal, &acks).await;
    let terminal = event_types(&mut app, &run_id).await;
    assert_eq!(terminal.iter().filter(|t| *t == "run.terminal").count(), 1);
}

#[tokio::test]
async fn stream_errors_name_the_grpc_code_as_the_contract_says() {
    let mut app = TestApp::spawn().await;
    app.runs.create_run(run_request("by hand")).await.unwrap();
    let identity = runner("raw");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .unwrap();
    let lease = raw.take_one().await;
    let refused = raw.append_refused(&lease, deltas(3, 4)).await;
    assert_eq!(refused.code, "INVALID_ARGUMENT", "{refused:?}");
}

#[tokio::test]
async fn a_resent_unary_batch_is_stored_once() {
    // Nothing heartbeats here: the lease must outlast a slow machine.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let run = app
        .runs
        .create_run(run_request("flaky network"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let me = runner("r");
    let a = claim(&mut app, &me, 1).await.remove(0);
    let mut acks = Vec::new();

    let first = app
        .runners
        .append_events(append(&me, &a, deltas(1, 5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.acked_runner_seq, first.duplicates), (5, 0));
    acks.push(Acked::new(&run.run_id, a.epoch, first.acked_runner_seq));
    // The acknowledgement was lost: the runner resends, then sends an overlapping batch.
    let resent = app
        .runners
        .append_events(append(&me, &a, deltas(1, 5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (resent.first_seq, resent.duplicates, resent.acked_runner_seq),
        (0, 5, 5)
    );
    let overlap = app
        .runners
        .append_events(append(&me, &a, deltas(4, 8)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((overlap.duplicates, overlap.acked_runner_seq), (2, 8));
    assert_eq!(overlap.last_seq - overlap.first_seq, 2);
    acks.push(Acked::new(&run.run_id, a.epoch, overlap.acked_runner_seq));
    // A batch that skips ahead is refused whole.
    let err = app
        .runners
        .append_events(append(&me, &a, deltas(10, 12)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].runner_seq"),
        "{}",
        err.message()
    );
    // The same batch sent eight times at once (a client retrying on timeouts): stored once.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let mut runners = app.runners.clone();
            let request = append(&me, &a, deltas(9, 12));
            tokio::spawn(async move { runners.append_events(request).await })
        })
        .collect();
    let mut fresh = 0;
    for racer in racers {
        let ack = racer
            .await
            .unwrap()
            .expect("a resend is acknowledged")
            .into_inner();
        assert_eq!(ack.acked_runner_seq, 12);
        fresh += 4 - ack.duplicates;
        acks.push(Acked::new(&run.run_id, a.epoch, ack.acked_runner_seq));
    }
    assert_eq!(
        fresh, 4,
        "the racing copies stored the batch once between them"
    );

    let db = app.db().await;
    let deltas_stored: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE run_id = $1 AND type = 'content.delta'",
            &[&Uuid::parse_str(&run.run_id).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deltas_stored, 12);
    assert_invariants(&db, Settled::InFlight, &acks).await;
}

// ---- the check itself ---------------------------------------------------------------------

#[tokio::test]
async fn the_invariant_check_catches_a_corrupted_database() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let runs: Vec<_> = (0..3)
        .map(|i| run_request(&format!("victim {i}")))
        .collect();
    let run_ids = create_all(&mut app.runs.clone(), runs).await;
    let me = runner("r");
    let held = claim(&mut app, &me, 3).await;
    let mut acks = Vec::new();
    for a in &held {
        let ack = app
            .runners
            .append_events(append(&me, a, deltas(1, 4)))
            .await
            .unwrap()
            .into_inner();
        acks.push(Acked::new(
            &a.run.as_ref().unwrap().run_id,
            a.epoch,
            ack.acked_runner_seq,
        ));
    }
    // One run is cancelled while held; its runner reports completed anyway.
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: held[2].run.as_ref().unwrap().run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for a in &held {
        app.runners
            .finish_run(finish(&me, a, RunStatus::Completed))
            .await
            .unwrap();
    }
    let db = app.db().await;

    // The paths the later checks read, one run each, made through the API: a lease that
    // expired once, a lease lost on the last attempt, requests resolved, expired and
    // cancelled, idempotency keys and a cancel the manager carried out itself.
    let lived = lived_through_a_requeue(&mut app, &me, &db).await;
    let lost = lost_on_the_last_attempt(&mut app, &db).await;
    let asked = asked_three_questions(&mut app, &me, &db).await;
    let keyed = keyed_and_cancelled_while_queued(&mut app).await;

    let summary = assert_invariants(&db, Settled::AllTerminal, &acks).await;
    assert_eq!(
        (
            summary.count(RunStatus::Completed),
            summary.count(RunStatus::Cancelled),
            summary.count(RunStatus::Failed),
        ),
        (4, 2, 1)
    );

    // Now break it, one invariant per run (or row), and see each reported.
    let ids: Vec<Uuid> = run_ids
        .iter()
        .map(|r| Uuid::parse_str(r).unwrap())
        .collect();
    let (gap, twice, cancelled) = (held_id(&held[0]), held_id(&held[1]), held_id(&held[2]));
    assert_eq!(ids.len(), 3);
    let pending = create_all(&mut app.runs.clone(), vec![run_request("never run")]).await;
    let never_run = Uuid::parse_str(&pending[0]).unwrap();
    agentrun_tests::tamper::make_events_writable(&db).await;
    corrupt(
        &db,
        "DELETE FROM events WHERE run_id = $1 AND runner_seq = 2",
        &[&gap],
    )
    .await;
    corrupt(
        &db,
        "INSERT INTO events (run_id, seq, type, payload, producer)
         SELECT run_id, seq + 1, type, payload, producer FROM events
         WHERE run_id = $1 AND type = 'run.terminal'",
        &[&twice],
    )
    .await;
    corrupt(
        &db,
        "UPDATE runs SET last_event_seq = last_event_seq + 1 WHERE id = $1",
        &[&twice],
    )
    .await;
    corrupt(
        &db,
        "UPDATE runs SET status = 'completed' WHERE id = $1",
        &[&cancelled],
    )
    .await;
    // The claim names another runner than the one that wrote: a write outside its lease.
    corrupt(
        &db,
        "UPDATE events SET payload = jsonb_set(payload, '{runner_id}', to_jsonb($2::text))
         WHERE run_id = $1 AND type = 'run.claimed'",
        &[&gap, &Uuid::new_v4().to_string()],
    )
    .await;
    // A delivery of a command the run does not have.
    corrupt(
        &db,
        "UPDATE events SET payload = jsonb_set(payload, '{command_id}', to_jsonb($2::text))
         WHERE run_id = $1 AND type = 'command.delivered'",
        &[&twice, &Uuid::new_v4().to_string()],
    )
    .await;
    // A third attempt that no expired lease paid for.
    corrupt(&db, "UPDATE runs SET attempt = 3 WHERE id = $1", &[&lived]).await;
    // The runner reported its turn completed; the row (the run's, which carries its first
    // turn) says failed.
    corrupt(
        &db,
        "UPDATE runs SET first_turn_status = 'failed' WHERE id = $1 AND first_turn_status = 'completed'",
        &[&lived],
    )
    .await;
    // The delivery under the second lease is gone: the runner finished a command it was
    // never given under that lease.
    corrupt(
        &db,
        "UPDATE events SET type = 'runtime.warning'
         WHERE run_id = $1 AND type = 'command.delivered'
           AND seq > (SELECT max(seq) FROM events WHERE run_id = $1 AND type = 'run.claimed')",
        &[&lived],
    )
    .await;
    // Failed runner_lost with an attempt to spare, and a claim naming the wrong attempt.
    corrupt(
        &db,
        "UPDATE runs SET max_attempts = 2 WHERE id = $1",
        &[&lost],
    )
    .await;
    corrupt(
        &db,
        "UPDATE events SET payload = jsonb_set(payload, '{attempt}', '2')
         WHERE run_id = $1 AND type = 'run.claimed'",
        &[&lost],
    )
    .await;
    // A command closed with its run whose closure is missing from the log.
    corrupt(
        &db,
        "DELETE FROM events
         WHERE run_id = $1 AND type = 'command.completed'
           AND payload->>'command_id' = (SELECT id::text FROM commands
                                         WHERE run_id = $1 AND kind = 'steer')",
        &[&keyed],
    )
    .await;
    // A queued run whose command (its first turn) a runner still holds (it was never
    // handed back).
    corrupt(
        &db,
        "UPDATE runs SET first_turn_status = 'acknowledged' WHERE id = $1",
        &[&never_run],
    )
    .await;
    // Requests: the cancelled one's closure is missing from the log, the resolved one's
    // answer changed after the fact, and the expired one's opening names another id.
    corrupt(
        &db,
        "DELETE FROM events
         WHERE run_id = $1 AND type = 'request.resolved' AND payload->>'request_id' = $2",
        &[&asked.run, &asked.cancelled.to_string()],
    )
    .await;
    corrupt(
        &db,
        "UPDATE requests SET resolution = '{\"decision\": \"decline\"}' WHERE id = $1",
        &[&asked.resolved],
    )
    .await;
    corrupt(
        &db,
        "UPDATE events SET payload = jsonb_set(payload, '{request_id}', to_jsonb($2::text))
         WHERE run_id = $1 AND type = 'request.opened' AND payload->>'request_id' = $3",
        &[
            &asked.run,
            &Uuid::new_v4().to_string(),
            &asked.expired.to_string(),
        ],
    )
    .await;
    // Idempotency: the stored request and command no longer hash to their fingerprints,
    // and, with the unique indexes gone, a key names two runs and two commands.
    corrupt(
        &db,
        "UPDATE runs SET input = '{\"prompt\": \"something else\"}' WHERE id = $1",
        &[&keyed],
    )
    .await;
    corrupt(
        &db,
        "UPDATE commands SET payload = '{\"text\": \"something else\"}'
         WHERE run_id = $1 AND kind = 'steer'",
        &[&keyed],
    )
    .await;
    db.batch_execute("DROP INDEX runs_idempotency; DROP INDEX commands_idempotency")
        .await
        .unwrap();
    corrupt(
        &db,
        "UPDATE runs SET idempotency_key = $2 WHERE id = $1",
        &[&lived, &KEYED_RUN],
    )
    .await;
    corrupt(
        &db,
        "UPDATE commands SET idempotency_key = $2 WHERE run_id = $1 AND kind = 'cancel'",
        &[&keyed, &KEYED_STEER],
    )
    .await;
    let mut too_much = acks.clone();
    too_much.push(Acked::new(&pending[0], 1, 3));

    let (_, violations) = invariant_violations(&db, Settled::AllTerminal, &too_much).await;
    let [lived, lost, keyed, never_run, twice] =
        [lived, lost, keyed, never_run, twice].map(|id| id.to_string());
    let [asked_run, resolved, cancelled_request, expired] =
        [asked.run, asked.resolved, asked.cancelled, asked.expired].map(|id| id.to_string());
    // Each check, with what its line must name: the corrupted run, row or detail.
    let expected: &[(&str, &[&str])] = &[
        ("event seq not gapless", &[]),
        ("runner events of an epoch not 1, 2, 3", &[]),
        ("acknowledged event missing", &[]),
        ("run.terminal count", &[]),
        ("completed after cancellation was requested", &[]),
        ("run.terminal not last or not the run's status", &[]),
        ("not settled", &[]),
        ("runner event outside its lease", &[]),
        (
            "attempt is not 1 + lease_expired requeues",
            &[&lived, "attempt 3"],
        ),
        (
            "event attempt disagrees with the requeues before it",
            &[&lost, "run.claimed"],
        ),
        ("runner_lost before the last attempt", &[&lost, "1 of 2"]),
        (
            "command event names no command of its run",
            &[&twice, "command.delivered"],
        ),
        (
            "command.completed does not match its command",
            &[&lived, "is failed", "says completed"],
        ),
        (
            "finished command without exactly one command.completed",
            &[&keyed, "(steer) is cancelled (run ended) with 0"],
        ),
        (
            "command.completed without a delivery under its lease",
            &[&lived],
        ),
        (
            "delivered command not held under the run's current lease",
            &[&never_run, "acknowledged while the run is pending"],
        ),
        (
            "request without its request.opened",
            &[&asked_run, &expired],
        ),
        (
            "request.resolved count",
            &[&cancelled_request, "cancelled with 0"],
        ),
        (
            "request.resolved does not match its request",
            &[&asked_run, &resolved, "(accept) names", "(decline)"],
        ),
        (
            "idempotency key names more than one row",
            &[KEYED_RUN, "2 runs"],
        ),
        (
            "idempotency key names more than one row",
            &[&keyed, KEYED_STEER, "2 commands"],
        ),
        (
            "idempotency fingerprint does not match",
            &[&keyed, "request_hash"],
        ),
        (
            "idempotency fingerprint does not match",
            &[&keyed, "command 2", KEYED_STEER, "payload_hash"],
        ),
    ];
    for (check, names) in expected {
        assert!(
            violations
                .iter()
                .any(|v| v.starts_with(check) && names.iter().all(|n| v.contains(n))),
            "{check:?} naming {names:?} not reported among {violations:#?}"
        );
    }
    let (_, in_flight) = invariant_violations(&db, Settled::TerminalOrPending, &acks).await;
    assert!(
        !in_flight.iter().any(|v| v.starts_with("not settled")),
        "a pending run is fine when runs may be queued: {in_flight:#?}"
    );

    // A run waiting for an answer nobody can give: it has no open request.
    corrupt(
        &db,
        "UPDATE runs SET status = 'waiting' WHERE id = $1",
        &[&pending[0].parse::<Uuid>().unwrap()],
    )
    .await;
    let (_, violations) = invariant_violations(&db, Settled::Any, &[]).await;
    assert!(
        violations
            .iter()
            .any(|v| v.starts_with("waiting run without an open request") && v.contains(&never_run)),
        "a waiting run without an open request not reported among {violations:#?}"
    );
}

fn held_id(a: &proto::Assignment) -> Uuid {
    Uuid::parse_str(&a.run.as_ref().unwrap().run_id).unwrap()
}

/// Runs one corrupting statement, which must change something.
async fn corrupt(
    db: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) {
    let changed = db.execute(sql, params).await.unwrap();
    assert!(changed > 0, "the corruption changed nothing: {sql}");
}

/// Waits until `sql` (whose `$1` is `id`) returns a row.
async fn wait_for_row(db: &tokio_postgres::Client, what: &str, sql: &str, id: Uuid) {
    wait_for(what, LONG, || async move {
        db.query_opt(sql, &[&id]).await.unwrap().map(drop)
    })
    .await;
}

/// Creates `request` (the only pending run) and has it claimed, through a replica with
/// a short lease, by a runner that never heartbeats: the lease expires. Returns its id.
async fn claimed_by_a_dying_runner(app: &mut TestApp, request: proto::CreateRunRequest) -> Uuid {
    let id = create_all(&mut app.runs.clone(), vec![request])
        .await
        .remove(0);
    let mut quick = TestApp::spawn_on(&app.database_url, |s| s.lease_ttl_ms = 500).await;
    let held = claim(&mut quick, &runner("dies"), 1).await;
    assert_eq!(held_id(&held[0]).to_string(), id);
    Uuid::parse_str(&id).unwrap()
}

/// A run whose first lease expires and is requeued, then claimed by `me`, which reports
/// its turn completed and finishes it. Returns its id.
async fn lived_through_a_requeue(
    app: &mut TestApp,
    me: &proto::RunnerIdentity,
    db: &tokio_postgres::Client,
) -> Uuid {
    let run = claimed_by_a_dying_runner(app, scripted("lived through a requeue", 3)).await;
    wait_for_row(
        db,
        "the expired lease to be requeued",
        "SELECT 1 FROM runs WHERE id = $1 AND status = 'pending' AND attempt = 2",
        run,
    )
    .await;
    let a = claim(app, me, 1).await.remove(0);
    assert_eq!(held_id(&a), run);
    let mut request = append(me, &a, deltas(1, 1));
    request.command_updates = vec![completed(&a.commands[0].command_id)];
    app.runners.append_events(request).await.unwrap();
    app.runners
        .finish_run(finish(me, &a, RunStatus::Completed))
        .await
        .unwrap();
    run
}

/// Runs whose first runner ends each one's only turn as the given state ("completed" or
/// "failed"), reports the turn's command done and dies before finishing them: they are
/// requeued with no command open. Returns their ids, in the order of `states`.
async fn turns_ended_then_runner_lost(
    app: &mut TestApp,
    db: &tokio_postgres::Client,
    states: &[&str],
) -> Vec<Uuid> {
    let requests = states.iter().map(|state| scripted(state, 3)).collect();
    let ids = create_all(&mut app.runs.clone(), requests).await;
    let mut quick = TestApp::spawn_on(&app.database_url, |s| s.lease_ttl_ms = 2_000).await;
    let me = runner("dies");
    let held = claim(&mut quick, &me, states.len() as i32).await;
    let mut runs = Vec::new();
    for (id, state) in ids.iter().zip(states) {
        let a = held
            .iter()
            .find(|a| held_id(a).to_string() == *id)
            .expect("every run is held");
        let turn_id = a.commands[0].command_id.clone();
        let mut ended = serde_json::json!({"turn_id": turn_id, "state": state});
        let mut report = completed(&turn_id);
        if *state == "failed" {
            ended["error"] = serde_json::json!({
                "kind": "provider_error", "message": "the model said no", "retryable": false,
            });
            report.status = proto::CommandStatus::Failed as i32;
            report.error = "the model said no".into();
        }
        let mut request = append(
            &me,
            a,
            runner_events(
                1,
                &[
                    ("turn.started", serde_json::json!({"turn_id": turn_id})),
                    ("turn.completed", ended),
                ],
            ),
        );
        request.command_updates = vec![report];
        quick.runners.append_events(request).await.unwrap();
        runs.push(held_id(a));
    }
    for run in &runs {
        wait_for_row(
            db,
            "the expired lease to be requeued",
            "SELECT 1 FROM runs WHERE id = $1 AND status = 'pending' AND attempt = 2",
            *run,
        )
        .await;
    }
    runs
}

/// A run with one attempt whose lease expires: failed `runner_lost`. Returns its id.
async fn lost_on_the_last_attempt(app: &mut TestApp, db: &tokio_postgres::Client) -> Uuid {
    let run = claimed_by_a_dying_runner(app, scripted("lost on the last attempt", 1)).await;
    wait_for_row(
        db,
        "the run to fail runner_lost",
        "SELECT 1 FROM runs WHERE id = $1 AND status = 'failed' AND failure_kind = 'runner_lost'",
        run,
    )
    .await;
    run
}

/// A runner's report that a command completed.
fn completed(command_id: &str) -> proto::CommandUpdate {
    proto::CommandUpdate {
        command_id: command_id.into(),
        status: proto::CommandStatus::Completed as i32,
        error: String::new(),
    }
}

/// Runner events numbered from `from`.
fn runner_events(from: i64, events: &[(&str, Value)]) -> Vec<proto::RunnerEvent> {
    events
        .iter()
        .zip(from..)
        .map(|((event_type, payload), runner_seq)| proto::RunnerEvent {
            runner_seq,
            r#type: (*event_type).into(),
            payload_json: payload.to_string(),
        })
        .collect()
}

/// A `request.opened` event, with a deadline when `timeout_ms` is given.
fn request_opened(id: Uuid, timeout_ms: Option<i64>) -> (&'static str, Value) {
    let mut payload = serde_json::json!({
        "request_id": id.to_string(),
        "kind": "command",
        "detail": {"command": "make deploy"},
        "options": ["accept", "decline"],
    });
    if let Some(ms) = timeout_ms {
        payload["timeout_ms"] = ms.into();
    }
    ("request.opened", payload)
}

/// The run of [`asked_three_questions`] and its requests.
struct Asked {
    run: Uuid,
    resolved: Uuid,
    expired: Uuid,
    cancelled: Uuid,
}

/// A run held by `me` that opens three requests in its turn: one a client resolves,
/// one that expires, one cancelled when the turn completes; then it finishes.
async fn asked_three_questions(
    app: &mut TestApp,
    me: &proto::RunnerIdentity,
    db: &tokio_postgres::Client,
) -> Asked {
    create_all(
        &mut app.runs.clone(),
        vec![run_request("asks three questions")],
    )
    .await;
    let a = claim(app, me, 1).await.remove(0);
    let run = held_id(&a);
    let turn = a.commands[0].command_id.clone();
    let (resolved, expired, cancelled) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let asking = [
        ("turn.started", serde_json::json!({ "turn_id": turn })),
        request_opened(resolved, None),
        request_opened(expired, Some(1)),
        request_opened(cancelled, None),
    ];
    app.runners
        .append_events(append(me, &a, runner_events(1, &asking)))
        .await
        .unwrap();
    app.runs
        .resolve_request(proto::ResolveRequestRequest {
            run_id: run.to_string(),
            request_id: resolved.to_string(),
            decision: "accept".into(),
            answers_json: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_row(
        db,
        "the request with a 1 ms deadline to expire",
        "SELECT 1 FROM requests WHERE id = $1 AND status = 'expired'",
        expired,
    )
    .await;
    let turn_ends = [(
        "turn.completed",
        serde_json::json!({"turn_id": turn, "state": "completed"}),
    )];
    let mut request = append(me, &a, runner_events(5, &turn_ends));
    request.command_updates = vec![completed(&turn)];
    app.runners.append_events(request).await.unwrap();
    app.runners
        .finish_run(finish(me, &a, RunStatus::Completed))
        .await
        .unwrap();
    let statuses: Vec<String> = db
        .query(
            "SELECT status FROM requests WHERE id = ANY($1) ORDER BY array_position($1, id)",
            &[&vec![resolved, expired, cancelled]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["resolved", "expired", "cancelled"]);
    Asked {
        run,
        resolved,
        expired,
        cancelled,
    }
}

/// The idempotency keys of [`keyed_and_cancelled_while_queued`].
const KEYED_RUN: &str = "keyed-run";
const KEYED_STEER: &str = "keyed-steer";

/// A run created with an idempotency key, given a steer with another, and cancelled
/// while queued (the manager carries the cancel out itself). Returns its id.
async fn keyed_and_cancelled_while_queued(app: &mut TestApp) -> Uuid {
    let request = proto::CreateRunRequest {
        idempotency_key: KEYED_RUN.into(),
        ..run_request("keyed")
    };
    let run_id = create_all(&mut app.runs.clone(), vec![request])
        .await
        .remove(0);
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.clone(),
            kind: proto::CommandKind::Steer as i32,
            payload_json: serde_json::json!({ "text": "keyed steer" }).to_string(),
            idempotency_key: KEYED_STEER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    Uuid::parse_str(&run_id).unwrap()
}
