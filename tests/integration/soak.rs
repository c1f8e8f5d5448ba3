//! The soak: many runs through two manager replicas and three runners while runners are
//! SIGKILLed at random (and started again) and a manager replica is SIGKILLed and
//! restarted mid-way; runs stream, fail, stall and get cancelled meanwhile. Then every
//! run must end, each as its prompt and its cancellation say, and the invariants hold
//! over the whole database.
//!
//! Its size comes from the environment:
//!
//! - `AGENTRUN_SOAK_RUNS`: runs created (default 300);
//! - `AGENTRUN_SOAK_SECONDS`: how long the faults go on; runs are created evenly over
//!   that time (default 10);
//! - `AGENTRUN_SOAK_SEED`: replays the same prompts, cancels and choice of victims
//!   (the timing is the machine's); each run prints its seed.
//!
//! The short version runs with every `cargo test`. The long one:
//!
//! ```text
//! AGENTRUN_SOAK_RUNS=5000 AGENTRUN_SOAK_SECONDS=300 \
//!     cargo test -p agentrun-tests --test integration soak -- --nocapture
//! ```
//!
//! It kills a manager replica once per minute of faults (at least once, mid-way).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::invariants::{Settled, assert_invariants, wait_all_terminal};
use agentrun_tests::*;
use tonic::Code;
use tonic::transport::Channel;

use crate::faults::{LONG, Restartable, assert_replies_whole, lazy_channel};

fn setting(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}")),
        _ => default,
    }
}

/// splitmix64: a seeded, reproducible source of choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

/// What a run was asked to do, and so how it must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Streams `[tokens:N]`: completed (or failed `runner_lost` after its last attempt).
    Tokens,
    /// `[fail]`: failed (a provider error, or its runner lost on every attempt).
    Fails,
    /// Streams, and is cancelled soon after it is created: cancelled if the cancel was
    /// accepted, else it had already ended.
    CancelledSoon,
    /// `[stall]` until cancelled: cancelled.
    Stalls,
}

const MAX_ATTEMPTS: i32 = 5;

fn pick(rng: &mut Rng) -> (Kind, String) {
    let tokens = rng.between(3, 30);
    match rng.below(100) {
        0..75 => (Kind::Tokens, format!("[tokens:{tokens}] soak")),
        75..85 => (Kind::Fails, "[fail] soak".into()),
        85..95 => (
            Kind::CancelledSoon,
            format!("[tokens:{tokens}] soak, cancelled"),
        ),
        _ => (Kind::Stalls, "[stall] soak".into()),
    }
}

/// The two replicas' clients; a call goes to one that answers.
struct Clients {
    replicas: [RunServiceClient<Channel>; 2],
    next: usize,
}

impl Clients {
    fn new(addrs: [SocketAddr; 2]) -> Self {
        Self {
            replicas: addrs.map(|addr| RunServiceClient::new(lazy_channel(addr))),
            next: 0,
        }
    }

    fn client(&mut self) -> RunServiceClient<Channel> {
        self.next += 1;
        self.replicas[self.next % 2].clone()
    }

    /// Creates the runs (idempotency keys make retries on the other replica safe).
    async fn create(&mut self, runs: Vec<proto::CreateRunRequest>) -> Vec<String> {
        let deadline = Instant::now() + LONG;
        loop {
            let response = self
                .client()
                .create_runs(proto::CreateRunsRequest { runs: runs.clone() })
                .await;
            match response {
                Ok(created) => {
                    return created
                        .into_inner()
                        .runs
                        .into_iter()
                        .map(|r| r.run.expect("a created run").run_id)
                        .collect();
                }
                Err(status) if retryable(&status) && Instant::now() < deadline => {}
                Err(status) => panic!("creating runs failed: {status:?}"),
            }
        }
    }

    /// Cancels a run; `true` if the cancel was accepted, `false` if the run had already
    /// ended.
    async fn cancel(&mut self, run_id: &str) -> bool {
        let deadline = Instant::now() + LONG;
        loop {
            let response = self
                .client()
                .cancel_run(proto::CancelRunRequest {
                    run_id: run_id.into(),
                    ..Default::default()
                })
                .await;
            match response {
                Ok(_) => return true,
                Err(status) if status.code() == Code::FailedPrecondition => return false,
                Err(status) if retryable(&status) && Instant::now() < deadline => {}
                Err(status) => panic!("cancelling {run_id} failed: {status:?}"),
            }
        }
    }
}

/// A replica that was killed, or whose connection broke: try the other one.
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

#[tokio::test]
async fn soak() {
    let runs = setting("AGENTRUN_SOAK_RUNS", 300) as usize;
    let seconds = setting("AGENTRUN_SOAK_SECONDS", 10);
    let seed = setting("AGENTRUN_SOAK_SEED", fastish_seed());
    println!("soak: {runs} runs over {seconds} s of faults, AGENTRUN_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let url = fresh_database().await;
    let addrs = [free_addr(), free_addr()];
    let mut managers = Vec::new();
    for addr in addrs {
        managers.push(ManagerProcess::start_at(&url, addr, &[]).await);
    }
    let db = db_client(&url).await;
    let mut clients = Clients::new(addrs);
    let urls = [
        format!("http://{},http://{}", addrs[0], addrs[1]),
        format!("http://{},http://{}", addrs[1], addrs[0]),
    ];
    let mut runners: Vec<Restartable> = (0..3)
        .map(|i| {
            let env = [
                ("AGENTRUN_MANAGER_URL", urls[i % 2].as_str()),
                ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "2"),
                ("AGENTRUN_MAX_CONCURRENCY", "8"),
            ];
            // r0 keeps its id across restarts: its runs come back at once.
            Restartable::start(addrs[i % 2], &format!("soak-{i}"), &env, i == 0)
        })
        .collect();

    // The schedule: runs created in waves (two a second) over the fault period, a runner
    // killed every second or two, a manager replica killed once a minute (at least once,
    // mid-way).
    let fault_period = Duration::from_secs(seconds);
    let waves = (seconds * 2).max(1) as usize;
    let per_wave = runs.div_ceil(waves);
    let manager_kills = (seconds / 60).max(1);
    let manager_kill_at: Vec<Duration> = (1..=manager_kills)
        .map(|k| fault_period.mul_f64(k as f64 / (manager_kills + 1) as f64))
        .collect();
    let mut kinds: HashMap<String, Kind> = HashMap::new();
    let mut to_cancel: Vec<(Instant, String)> = Vec::new();
    let mut cancelled: Vec<String> = Vec::new();
    let (mut runner_kills, mut replica_kills) = (0, 0);
    let mut next_runner_kill = Instant::now() + Duration::from_millis(rng.between(700, 2000));
    let chaos_started = Instant::now();
    let mut created = 0;
    let mut wave = 0;
    while created < runs || chaos_started.elapsed() < fault_period {
        // Create the waves that are due.
        let due = ((chaos_started.elapsed().as_secs_f64() / fault_period.as_secs_f64()
            * waves as f64) as usize
            + 1)
        .min(waves);
        while wave < due && created < runs {
            let n = per_wave.min(runs - created);
            let picks: Vec<(Kind, String)> = (0..n).map(|_| pick(&mut rng)).collect();
            let requests = picks
                .iter()
                .enumerate()
                .map(|(i, (_, prompt))| proto::CreateRunRequest {
                    max_attempts: MAX_ATTEMPTS,
                    idempotency_key: format!("soak-{seed}-{}", created + i),
                    ..run_request(prompt)
                })
                .collect();
            let ids = clients.create(requests).await;
            for (id, (kind, _)) in ids.into_iter().zip(picks) {
                if matches!(kind, Kind::CancelledSoon | Kind::Stalls) {
                    let after = Duration::from_millis(rng.between(0, 1500));
                    to_cancel.push((Instant::now() + after, id.clone()));
                }
                kinds.insert(id, kind);
            }
            created += n;
            wave += 1;
        }
        // Cancel what is due.
        let now = Instant::now();
        let (due_now, later): (Vec<_>, Vec<_>) =
            to_cancel.into_iter().partition(|(at, _)| *at <= now);
        to_cancel = later;
        for (_, id) in due_now {
            if clients.cancel(&id).await {
                cancelled.push(id);
            }
        }
        // Kill a runner mid-turn now and then; start it again at once.
        if Instant::now() >= next_runner_kill {
            let victim = rng.below(runners.len() as u64) as usize;
            runners[victim].kill_and_restart().await;
            runner_kills += 1;
            next_runner_kill = Instant::now() + Duration::from_millis(rng.between(700, 2000));
        }
        // Kill a manager replica; it comes back after a second, on the same address.
        if manager_kill_at
            .get(replica_kills)
            .is_some_and(|at| chaos_started.elapsed() >= *at)
        {
            let victim = replica_kills % 2;
            managers[victim].kill();
            // How long the replica stays down: the fault, not a wait for a condition.
            tokio::time::sleep(Duration::from_secs(1)).await;
            managers[victim] = ManagerProcess::start_at(&url, addrs[victim], &[]).await;
            replica_kills += 1;
        }
        // Pacing of the fault loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cancels still planned go out now.
    for (_, id) in std::mem::take(&mut to_cancel) {
        if clients.cancel(&id).await {
            cancelled.push(id);
        }
    }
    let faults_over = started.elapsed();

    let settle = LONG + Duration::from_millis(20 * runs as u64);
    wait_all_terminal(&db, settle).await;
    let summary = assert_invariants(&db, Settled::AllTerminal, &[]).await;
    println!(
        "soak: {summary}; {runner_kills} runner kills, {replica_kills} replica kills; \
         faults for {faults_over:?}, all ended after {:?}",
        started.elapsed()
    );
    assert_eq!(
        summary.runs, runs as i64,
        "runs created once each, none lost"
    );
    assert!(runner_kills > 0 && replica_kills > 0);

    // Each run ended as its prompt and its cancellation say.
    let rows = db
        .query(
            "SELECT id::text, status, coalesce(failure_kind, ''), attempt FROM runs",
            &[],
        )
        .await
        .unwrap();
    let cancelled: std::collections::HashSet<String> = cancelled.into_iter().collect();
    let mut runner_lost = 0;
    for row in rows {
        let (id, status, failure_kind, attempt): (String, String, String, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let kind = kinds
            .get(&id)
            .unwrap_or_else(|| panic!("run {id} was never created by the soak"));
        let lost = status == "failed" && failure_kind == "runner_lost" && attempt == MAX_ATTEMPTS;
        runner_lost += usize::from(lost);
        let expected = if cancelled.contains(&id) {
            status == "cancelled"
        } else {
            match kind {
                Kind::Tokens | Kind::CancelledSoon => status == "completed" || lost,
                Kind::Fails => status == "failed",
                // A stalled run's cancel is always accepted: it cannot end by itself.
                Kind::Stalls => false,
            }
        };
        assert!(
            expected,
            "run {id} ({kind:?}, cancel accepted: {}) ended {status} {failure_kind} at attempt {attempt}",
            cancelled.contains(&id)
        );
    }
    let completed = summary.count(RunStatus::Completed) as usize;
    assert_eq!(assert_replies_whole(&db).await, completed);
    println!("soak: {runner_lost} runs lost their runner {MAX_ATTEMPTS} times");
    drop(runners);
}

/// A seed that differs from run to run (the nanoseconds of now).
fn fastish_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}
