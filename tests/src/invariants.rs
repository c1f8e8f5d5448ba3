//! The invariants every fault test ends with, checked over the whole database.
//!
//! Fault tests kill, freeze, partition and restart real processes; whatever happened,
//! the database must still tell a consistent story. [`assert_invariants`] reads it in
//! one repeatable-read snapshot and checks:
//!
//! - every run is terminal, or legitimately not yet ([`Settled`] says what the caller
//!   expects: all ended, queued, or still in flight under a live lease);
//! - leases have the shape their status implies (active runs hold one, queued runs do
//!   not, ended runs have `finished_at`);
//! - `attempt` stays within `1..=max_attempts`, is 1 + the run's `run.requeued` events
//!   whose reason is `lease_expired` (a `released` requeue does not count), and every
//!   lifecycle event naming an attempt (`run.claimed`, `run.started`, `run.requeued`,
//!   `run.terminal`) names the one counted so far;
//! - a run failed `runner_lost` is on its last attempt (`attempt = max_attempts`);
//! - per run, event `seq` is gapless `1..=last_event_seq` and command `seq` is gapless
//!   `1..=last_command_seq`; a run whose deltas retention compacted
//!   (`events_compacted_at`) is ended, and its missing seqs are exactly those its merged
//!   deltas account for (`compacted_deltas` − 1 each, all within
//!   `compacted_through_seq`), so nothing but deltas is gone;
//! - no `(run, epoch, runner_seq)` is stored twice, and within an epoch the runner
//!   events continue `1, 2, 3, ...` in seq order (nothing lost, reordered or skipped;
//!   in a `coalesced` or `final` run, whose merged or live-only deltas leave runner_seqs
//!   unstored, or in a compacted run, they only rise);
//! - fencing: every runner event sits under the `run.claimed` of its own epoch and
//!   runner, with no requeue or terminal event in between (a zombie cannot write);
//! - exactly one `run.terminal` per ended run (none for the others), it is the run's
//!   last event and names the run's status;
//! - no run whose cancellation was requested ended `completed`, and no `run.terminal`
//!   saying completed follows a `cancel` command;
//! - an ended run has no open command and no open request;
//! - commands against their events: every `command.delivered` / `command.completed`
//!   names a command of its run; a `command.completed` names the command's (final)
//!   status and is the only one for it; one reporting a runner's work follows a delivery
//!   of that command under the same lease (the manager's own closures — cancelled with
//!   the run, withdrawn before delivery, a cancel it carried out — say `closed_by:
//!   manager`); every finished command has its `command.completed`, so a client
//!   following only events never shows a command that no longer waits; a delivered or
//!   acknowledged command belongs to an active run and was delivered under its current
//!   lease (a command held by a runner that lost its lease is owed again);
//! - requests against their events: every request has its `request.opened`; a closed
//!   request (resolved, expired, or cancelled with its turn or run) has exactly one
//!   `request.resolved`, naming its decision, and an open one has none; every
//!   `request.resolved` names a request of its run; a waiting run has an open request;
//! - idempotency: a key names one run per tenant and one command per run, and every
//!   stored fingerprint (`runs.request_hash`, `commands.payload_hash`) is the hash of
//!   the row's own request, so a retry is told from a conflicting reuse correctly;
//! - optionally, every acknowledgement a runner received ([`Acked`]) is backed by the
//!   stored events it acknowledged (in runs not compacted; a compacted run's deltas are
//!   accounted for by the check above).
//!
//! Everything is read through SQL on the schema in `migrations/` (not manager code), so
//! the check holds whatever the manager's internals look like. The one exception is the
//! canonical rendering hashed into the fingerprints, which mirrors the manager's (see
//! [`run_fingerprint_text`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use agentrun_shared::proto;
use agentrun_shared::state::{CommandStatus, RunStatus};
use serde_json::{Value, json};
use uuid::Uuid;

/// How far a run may be from done when the invariants are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every run has ended.
    AllTerminal,
    /// Every run has ended or waits in the queue (`pending`, maybe scheduled for later
    /// or wanting a runner nobody runs); none is held by a runner.
    TerminalOrPending,
    /// Runs may still be in flight: besides ended and queued runs, a claimed, running or
    /// waiting run is fine while its lease is live (or expired less than
    /// [`LEASE_GRACE`] ago: the sweeper has not come round yet).
    InFlight,
    /// Any status: only the log, the counters and the lease shapes are checked (for
    /// checks in the middle of a test).
    Any,
}

/// How long after its lease expired an active run still counts as in flight.
pub const LEASE_GRACE: Duration = Duration::from_secs(5);

/// An acknowledgement a runner received: the events of `run_id` written under `epoch`
/// with runner_seq `1..=acked_runner_seq` are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Acked {
    pub run_id: Uuid,
    pub epoch: i64,
    pub acked_runner_seq: i64,
}

impl Acked {
    /// From an `AppendEvents` response for `run_id` under `epoch`.
    pub fn new(run_id: &str, epoch: i64, acked_runner_seq: i64) -> Self {
        Self {
            run_id: Uuid::parse_str(run_id).expect("a run id"),
            epoch,
            acked_runner_seq,
        }
    }

    /// From an `event_ack` received on the Connect stream.
    pub fn from_ack(ack: &proto::EventAck) -> Self {
        let result = ack
            .result
            .as_ref()
            .expect("an event ack carries its result");
        Self::new(&ack.run_id, ack.epoch, result.acked_runner_seq)
    }

    /// From a `resumed` lease in a welcome: the manager says this much is stored.
    pub fn from_resumed(lease: &proto::ResumedLease) -> Self {
        Self::new(&lease.run_id, lease.epoch, lease.acked_runner_seq)
    }
}

/// What the database held when the invariants were checked.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Runs per status (database spelling).
    pub by_status: BTreeMap<String, i64>,
    pub runs: i64,
    pub events: i64,
}

impl Summary {
    /// Runs in `status`.
    pub fn count(&self, status: proto::RunStatus) -> i64 {
        let status = RunStatus::from_proto("status", status as i32).expect("a known status");
        self.by_status.get(status.as_str()).copied().unwrap_or(0)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} runs (", self.runs)?;
        for (i, (status, n)) in self.by_status.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{n} {status}")?;
        }
        write!(f, "), {} events", self.events)
    }
}

/// Checks every invariant (see the module documentation) and panics listing each
/// violation found. `acked` are acknowledgements runners received that must be backed
/// by stored events (empty when the test did not drive the protocol itself).
pub async fn assert_invariants(
    db: &tokio_postgres::Client,
    settled: Settled,
    acked: &[Acked],
) -> Summary {
    let (summary, violations) = invariant_violations(db, settled, acked).await;
    if !violations.is_empty() {
        let shown: Vec<&str> = violations.iter().take(40).map(String::as_str).collect();
        panic!(
            "{} invariant violations over {summary}:\n  {}{}",
            violations.len(),
            shown.join("\n  "),
            if violations.len() > shown.len() {
                "\n  ..."
            } else {
                ""
            }
        );
    }
    summary
}

/// Like [`assert_invariants`], returning the violations instead of panicking (each a
/// line naming the check and the run).
pub async fn invariant_violations(
    db: &tokio_postgres::Client,
    settled: Settled,
    acked: &[Acked],
) -> (Summary, Vec<String>) {
    // One snapshot: a manager still writing cannot make the checks disagree.
    db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .expect("begin the invariant snapshot");
    let result = check(db, settled, acked).await;
    db.batch_execute("ROLLBACK")
        .await
        .expect("end the invariant snapshot");
    result.unwrap_or_else(|err| panic!("an invariant query failed: {err:?}"))
}

fn statuses(filter: impl Fn(RunStatus) -> bool) -> Vec<&'static str> {
    RunStatus::ALL
        .iter()
        .copied()
        .filter(|s| filter(*s))
        .map(RunStatus::as_str)
        .collect()
}

/// The status list a check's `$1` stands for.
#[derive(Clone, Copy)]
enum Param {
    None,
    Terminal,
    Active,
    /// Command statuses that are final (`CommandStatus::is_final`).
    CommandFinal,
}

/// The fixed checks: what is violated, the parameter, and a query returning one text
/// column per violation.
const CHECKS: &[(&str, Param, &str)] = &[
    (
        "active run without a lease",
        Param::Active,
        "SELECT id::text || ' is ' || status || ' with lease holder ' || coalesce(lease_runner_id::text, 'none')
                || ', epoch ' || lease_epoch || ', expiry ' || coalesce(lease_expires_at::text, 'none')
         FROM runs WHERE status = ANY($1)
           AND (lease_runner_id IS NULL OR lease_expires_at IS NULL OR lease_epoch < 1)",
    ),
    (
        "queued run still leased",
        Param::None,
        "SELECT id::text || ' is pending but held by ' || lease_runner_id::text
         FROM runs WHERE status = 'pending' AND lease_runner_id IS NOT NULL",
    ),
    (
        "ended run without finished_at",
        Param::Terminal,
        "SELECT id::text || ' is ' || status FROM runs
         WHERE status = ANY($1) AND finished_at IS NULL",
    ),
    (
        "attempt out of range",
        Param::None,
        "SELECT id::text || ' is at attempt ' || attempt || ' of ' || max_attempts FROM runs
         WHERE (attempt < 1 OR attempt > max_attempts)",
    ),
    (
        "attempt is not 1 + lease_expired requeues",
        Param::None,
        // Only an expired lease costs an attempt (`runs::requeue_many`): a runner that
        // gives its run back while draining (`released`) does not.
        "SELECT r.id::text || ' is at attempt ' || r.attempt || ' after ' || count(e.seq)
                || ' lease_expired requeues'
         FROM runs r
         LEFT JOIN events e ON e.run_id = r.id AND e.type = 'run.requeued' AND e.producer = 'manager'
                           AND e.payload->>'reason' = 'lease_expired'
         GROUP BY r.id, r.attempt
         HAVING r.attempt <> 1 + count(e.seq)",
    ),
    (
        "event attempt disagrees with the requeues before it",
        Param::None,
        // Each lifecycle event names the attempt it happened in: 1 + the lease_expired
        // requeues up to and including it. The other reasons (`RequeueReason`) are free.
        "SELECT run_id::text || ' seq ' || seq || ' (' || type || coalesce(' ' || (payload->>'reason'), '')
                || ') says attempt ' || coalesce(payload->>'attempt', 'nothing') || ' after '
                || (expected - 1) || ' lease_expired requeues'
         FROM (SELECT run_id, seq, type, payload,
                      1 + count(*) FILTER (WHERE type = 'run.requeued' AND payload->>'reason' = 'lease_expired')
                          OVER (PARTITION BY run_id ORDER BY seq ROWS UNBOUNDED PRECEDING) AS expected
               FROM events
               WHERE producer = 'manager'
                 AND type IN ('run.claimed', 'run.started', 'run.requeued', 'run.terminal')) e
         WHERE payload->>'attempt' IS DISTINCT FROM expected::text
            OR (type = 'run.requeued'
                AND coalesce(payload->>'reason', '') NOT IN ('lease_expired', 'released', 'turn_queued'))",
    ),
    (
        "runner_lost before the last attempt",
        Param::None,
        // The sweeper fails a run `runner_lost` only when its lease expired on the last
        // attempt; before that it requeues it. (A runner could report the same
        // failure_kind itself through FinishRun; none of ours does.)
        "SELECT id::text || ' is ' || status || ' runner_lost at attempt ' || attempt || ' of ' || max_attempts
         FROM runs WHERE failure_kind = 'runner_lost' AND (attempt <> max_attempts OR status <> 'failed')",
    ),
    (
        "event seq not gapless",
        Param::None,
        "SELECT r.id::text || ': last_event_seq ' || r.last_event_seq || ' but ' || count(e.seq)
                || ' events, seq ' || coalesce(min(e.seq), 0) || '..' || coalesce(max(e.seq), 0)
         FROM runs r LEFT JOIN events e ON e.run_id = r.id
         WHERE r.events_compacted_at IS NULL
         GROUP BY r.id, r.last_event_seq
         HAVING count(e.seq) <> r.last_event_seq OR coalesce(max(e.seq), 0) <> r.last_event_seq
             OR coalesce(min(e.seq), 1) <> 1",
    ),
    (
        "compacted run missing more than its merged deltas",
        Param::Terminal,
        // Each merged delta stands for `compacted_deltas` stored ones, the others having
        // had seqs after it, up to `compacted_through_seq`.
        "SELECT r.id::text || ' (' || r.status || '): last_event_seq ' || r.last_event_seq || ' but '
                || count(e.seq) || ' events + ' || coalesce(sum(m.merged - 1), 0)
                || ' merged away, seq ' || coalesce(min(e.seq), 0) || '..' || coalesce(max(e.seq), 0)
         FROM runs r
         LEFT JOIN events e ON e.run_id = r.id
         LEFT JOIN LATERAL (
             SELECT (e.payload->>'compacted_deltas')::bigint AS merged,
                    (e.payload->>'compacted_through_seq')::bigint AS through
             WHERE e.type = 'content.delta' AND e.payload ? 'compacted_deltas'
         ) m ON true
         WHERE r.events_compacted_at IS NOT NULL
         GROUP BY r.id, r.status, r.last_event_seq
         HAVING NOT (r.status = ANY($1))
             OR count(e.seq) + coalesce(sum(m.merged - 1), 0) <> r.last_event_seq
             OR coalesce(max(e.seq), 0) <> r.last_event_seq OR coalesce(min(e.seq), 1) <> 1
             OR bool_or(m.through <= e.seq OR m.merged < 2)",
    ),
    (
        "events of no run",
        Param::None,
        "SELECT e.run_id::text || ' has ' || count(*) || ' events but no run row'
         FROM events e LEFT JOIN runs r ON r.id = e.run_id
         WHERE r.id IS NULL
         GROUP BY e.run_id",
    ),
    (
        "command seq not gapless",
        Param::None,
        "SELECT r.id::text || ': last_command_seq ' || r.last_command_seq || ' but ' || count(c.seq)
                || ' commands, seq ' || coalesce(min(c.seq), 0) || '..' || coalesce(max(c.seq), 0)
         FROM runs r LEFT JOIN run_commands c ON c.run_id = r.id
         GROUP BY r.id, r.last_command_seq
         HAVING count(c.seq) <> r.last_command_seq OR coalesce(max(c.seq), 0) <> r.last_command_seq
             OR coalesce(min(c.seq), 1) <> 1",
    ),
    (
        "runner event stored twice",
        Param::None,
        "SELECT run_id::text || ' epoch ' || epoch || ' runner_seq ' || runner_seq || ' stored '
                || count(*) || ' times'
         FROM events WHERE runner_seq IS NOT NULL
         GROUP BY run_id, epoch, runner_seq HAVING count(*) > 1",
    ),
    (
        "runner event without its producer",
        Param::None,
        "SELECT run_id::text || ' seq ' || seq || ' (' || type || ') lacks runner id, epoch or runner_seq'
         FROM events WHERE producer = 'runner'
           AND (runner_id IS NULL OR epoch IS NULL OR runner_seq IS NULL)",
    ),
    (
        "runner events of an epoch not 1, 2, 3, ... in seq order",
        Param::None,
        // A coalesced or final run stores fewer events than its runner sent (merged or
        // live-only deltas), and so does a compacted one: their runner_seqs only rise.
        "SELECT run_id::text || ' epoch ' || epoch || ': runner_seq ' || runner_seq || ' at seq ' || seq
                || ' follows runner_seq ' || coalesce(previous::text, 'nothing')
         FROM (SELECT e.run_id, e.epoch, e.seq, e.runner_seq,
                      lag(e.runner_seq) OVER (PARTITION BY e.run_id, e.epoch ORDER BY e.seq) AS previous
               FROM events e WHERE e.runner_seq IS NOT NULL) e
         JOIN runs r ON r.id = e.run_id
         WHERE CASE WHEN r.stream_mode = 'deltas' AND r.events_compacted_at IS NULL
                    THEN runner_seq <> coalesce(previous, 0) + 1
                    ELSE runner_seq <= coalesce(previous, 0) END",
    ),
    (
        "runner event outside its lease (fencing)",
        Param::None,
        // The last lifecycle mark (claim, requeue, terminal) before each runner event must
        // be the claim of that event's epoch by that event's runner.
        "SELECT e.run_id::text || ' seq ' || e.seq || ' (' || e.type || ', epoch ' || e.epoch
                || ') follows ' || coalesce(m.type || ' at seq ' || m.seq || ' ' || m.payload::text, 'no claim')
         FROM (SELECT run_id, seq, type, producer, runner_id, epoch,
                      max(seq) FILTER (WHERE producer = 'manager'
                                         AND type IN ('run.claimed', 'run.requeued', 'run.terminal'))
                          OVER (PARTITION BY run_id ORDER BY seq ROWS UNBOUNDED PRECEDING) AS mark
               FROM events) e
         LEFT JOIN events m ON m.run_id = e.run_id AND m.seq = e.mark
         WHERE e.producer = 'runner'
           AND (m.seq IS NULL OR m.type <> 'run.claimed'
                OR (m.payload->>'epoch')::bigint IS DISTINCT FROM e.epoch
                OR m.payload->>'runner_id' IS DISTINCT FROM e.runner_id::text)",
    ),
    (
        "run.terminal count",
        Param::Terminal,
        "SELECT r.id::text || ' (' || r.status || ') has ' || count(e.seq) || ' run.terminal events'
         FROM runs r LEFT JOIN events e ON e.run_id = r.id AND e.type = 'run.terminal'
         GROUP BY r.id, r.status
         HAVING count(e.seq) <> CASE WHEN r.status = ANY($1) THEN 1 ELSE 0 END",
    ),
    (
        "run.terminal not last or not the run's status",
        Param::None,
        "SELECT r.id::text || ' is ' || r.status || ' with ' || r.last_event_seq || ' events; run.terminal at seq '
                || e.seq || ' says ' || coalesce(e.payload->>'status', 'nothing')
         FROM runs r JOIN events e ON e.run_id = r.id AND e.type = 'run.terminal'
         WHERE (e.seq <> r.last_event_seq OR e.payload->>'status' IS DISTINCT FROM r.status)",
    ),
    (
        "completed after cancellation was requested",
        Param::None,
        "SELECT id::text || ' ended completed with cancel_requested' FROM runs
         WHERE status = 'completed' AND cancel_requested",
    ),
    (
        "run.terminal completed after a cancel command",
        Param::None,
        "SELECT t.run_id::text || ': cancel command at seq ' || min(c.seq) || ', run.terminal completed at seq ' || t.seq
         FROM events t
         JOIN events c ON c.run_id = t.run_id AND c.seq < t.seq
                      AND c.type = 'command.created' AND c.payload->>'kind' = 'cancel'
         WHERE t.type = 'run.terminal' AND t.payload->>'status' = 'completed'
          
         GROUP BY t.run_id, t.seq",
    ),
    (
        "open command on an ended run",
        Param::Terminal,
        "SELECT r.id::text || ' is ' || r.status || ' but command ' || c.seq || ' (' || c.kind || ') is ' || c.status
         FROM runs r JOIN run_commands c ON c.run_id = r.id
         WHERE r.status = ANY($1) AND c.status IN ('pending', 'delivered', 'acknowledged')",
    ),
    (
        "open request on an ended run",
        Param::Terminal,
        "SELECT r.id::text || ' is ' || r.status || ' but request ' || q.id::text || ' is open'
         FROM runs r JOIN requests q ON q.run_id = r.id
         WHERE r.status = ANY($1) AND q.status = 'open'",
    ),
    // ---- commands against their events (`store/commands.rs`, `store/leases/writes.rs`)
    (
        "command event names no command of its run",
        Param::None,
        "SELECT e.run_id::text || ' seq ' || e.seq || ' (' || e.type || ') names '
                || coalesce(e.payload->>'command_id', 'no command') || ', not a command of its run'
         FROM events e
         WHERE e.type IN ('command.delivered', 'command.completed')
           AND NOT EXISTS (SELECT 1 FROM run_commands c
                           WHERE c.run_id = e.run_id AND c.id::text = e.payload->>'command_id')",
    ),
    (
        "command.completed does not match its command",
        Param::CommandFinal,
        // The event names the status the runner reported; final statuses never change,
        // so the row still holds it.
        "SELECT e.run_id::text || ': command ' || c.seq || ' (' || c.kind || ') is ' || c.status
                || ' but command.completed at seq ' || e.seq || ' says ' || coalesce(e.payload->>'status', 'nothing')
         FROM events e
         JOIN run_commands c ON c.run_id = e.run_id AND c.id::text = e.payload->>'command_id'
         WHERE e.type = 'command.completed'
           AND (e.payload->>'status' IS DISTINCT FROM c.status OR NOT c.status = ANY($1))",
    ),
    (
        "finished command without exactly one command.completed",
        Param::CommandFinal,
        // Every closure is an event: a runner's report that finishes a command, and the
        // manager's own (open commands cancelled with their run, a command withdrawn
        // before delivery, the cancel of a queued run that the manager carries out). An
        // open command has none.
        "SELECT c.run_id::text || ': command ' || c.seq || ' (' || c.kind || ') is ' || c.status
                || coalesce(' (' || c.error || ')', '') || ' with ' || count(e.seq) || ' command.completed events'
         FROM run_commands c
         LEFT JOIN events e ON e.run_id = c.run_id AND e.type = 'command.completed'
                           AND e.payload->>'command_id' = c.id::text
         GROUP BY c.run_id, c.seq, c.kind, c.status, c.error
         HAVING count(e.seq) <> CASE WHEN c.status = ANY($1) THEN 1 ELSE 0 END",
    ),
    (
        "command.completed without a delivery under its lease",
        Param::None,
        // A runner can only finish a command it was given: delivered (or acknowledged)
        // after the run's latest claim, since a requeue or a restarted runner's adoption
        // puts every delivered command back to pending and the claim delivers it again.
        // The manager's own closures (`closed_by: manager`) need no delivery.
        "SELECT e.run_id::text || ': command.completed at seq ' || e.seq || ' for '
                || coalesce(e.payload->>'command_id', 'no command') || ' has no command.delivered since '
                || coalesce('the claim at seq ' || e.claim, 'the start')
         FROM (SELECT run_id, seq, type, payload,
                      max(seq) FILTER (WHERE type = 'run.claimed')
                          OVER (PARTITION BY run_id ORDER BY seq ROWS UNBOUNDED PRECEDING) AS claim
               FROM events
               WHERE producer = 'manager' AND type IN ('run.claimed', 'command.completed')) e
         WHERE e.type = 'command.completed'
           AND e.payload->>'closed_by' IS DISTINCT FROM 'manager'
           AND NOT EXISTS (SELECT 1 FROM events d
                           WHERE d.run_id = e.run_id AND d.type = 'command.delivered'
                             AND d.seq > coalesce(e.claim, 0) AND d.seq < e.seq
                             AND d.payload->>'command_id' = e.payload->>'command_id')",
    ),
    (
        "delivered command not held under the run's current lease",
        Param::Active,
        // What a runner was given but did not finish survives it: when its lease is lost
        // the command goes back to pending (`commands::redeliver`) for the next claim, so
        // a queued run holds no delivered command and an active run's were delivered
        // since its latest claim. (Ended runs: see "open command on an ended run".)
        "SELECT c.run_id::text || ': command ' || c.seq || ' (' || c.kind || ') is ' || c.status
                || ' while the run is ' || r.status || coalesce(', last claimed at seq ' || l.claim, '')
         FROM run_commands c
         JOIN runs r ON r.id = c.run_id
         LEFT JOIN LATERAL (SELECT max(seq) AS claim FROM events
                            WHERE run_id = c.run_id AND type = 'run.claimed') l ON true
         WHERE c.status IN ('delivered', 'acknowledged')
           AND (r.status = 'pending'
                OR (r.status = ANY($1)
                    AND NOT EXISTS (SELECT 1 FROM events d
                                    WHERE d.run_id = c.run_id AND d.type = 'command.delivered'
                                      AND d.seq > coalesce(l.claim, 0)
                                      AND d.payload->>'command_id' = c.id::text)))",
    ),
    // ---- requests against their events (`store/requests.rs`)
    (
        "request without its request.opened",
        Param::None,
        // The runner's event may spell the id in any form a UUID parses from.
        "SELECT q.run_id::text || ': request ' || q.id::text || ' (' || q.status || ') has no request.opened event'
         FROM requests q
         WHERE NOT EXISTS (
             SELECT 1 FROM events e
             WHERE e.run_id = q.run_id AND e.type = 'request.opened'
               AND lower(regexp_replace(e.payload->>'request_id', '^urn:uuid:|[{}-]', '', 'gi'))
                   = replace(q.id::text, '-', ''))",
    ),
    (
        "request.resolved count",
        Param::None,
        // Resolved by a person (`requests::resolve`) or expired by the sweeper
        // (`requests::expire_due`), or cancelled with its turn or run
        // (`requests::cancel_for_turns`, `cancel_for_runs`): one request.resolved. Open:
        // none. The sweeper skips the event for a run that has ended, but an ended run
        // has no open request to expire: its requests were cancelled when it ended.
        "SELECT q.run_id::text || ': request ' || q.id::text || ' is ' || q.status || ' with '
                || count(e.seq) || ' request.resolved events'
         FROM requests q
         LEFT JOIN events e ON e.run_id = q.run_id AND e.type = 'request.resolved'
                           AND e.payload->>'request_id' = q.id::text
         GROUP BY q.run_id, q.id, q.status
         HAVING count(e.seq) <> CASE WHEN q.status = 'open' THEN 0 ELSE 1 END",
    ),
    (
        "request.resolved does not match its request",
        Param::None,
        "SELECT e.run_id::text || ': request.resolved at seq ' || e.seq || ' ('
                || coalesce(e.payload->>'decision', 'no decision') || ') names '
                || coalesce('request ' || q.id::text || ', which is ' || q.status
                                || coalesce(' (' || (q.resolution->>'decision') || ')', ''),
                            coalesce(e.payload->>'request_id', 'nothing') || ', no request of its run')
         FROM events e
         LEFT JOIN requests q ON q.run_id = e.run_id AND q.id::text = e.payload->>'request_id'
         WHERE e.type = 'request.resolved'
           AND (q.id IS NULL OR q.status = 'open'
                OR e.payload->>'decision' IS DISTINCT FROM q.resolution->>'decision')",
    ),
    (
        "waiting run without an open request",
        Param::None,
        "SELECT r.id::text || ' is waiting with no open request' FROM runs r
         WHERE r.status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM requests q WHERE q.run_id = r.id AND q.status = 'open')",
    ),
    // ---- idempotency keys
    (
        "idempotency key names more than one row",
        Param::None,
        // The unique indexes `runs_idempotency` and `commands_idempotency` forbid this
        // while they exist; this is what notices a migration that drops or narrows them
        // (the corruption test drops them). What the manager itself must keep right is
        // checked by `fingerprint_violations`.
        "SELECT 'tenant ' || tenant_id || ': key ' || idempotency_key || ' names ' || count(*) || ' runs'
         FROM runs WHERE idempotency_key IS NOT NULL
         GROUP BY tenant_id, idempotency_key HAVING count(*) > 1
         UNION ALL
         SELECT run_id::text || ': key ' || idempotency_key || ' names ' || count(*) || ' commands'
         FROM commands WHERE idempotency_key IS NOT NULL
         GROUP BY run_id, idempotency_key HAVING count(*) > 1",
    ),
];

/// At most this many violations are listed per check.
const PER_CHECK: usize = 10;

async fn check(
    db: &tokio_postgres::Client,
    settled: Settled,
    acked: &[Acked],
) -> Result<(Summary, Vec<String>), tokio_postgres::Error> {
    let terminal = statuses(RunStatus::is_terminal);
    let active = statuses(|s| RunStatus::ACTIVE.contains(&s));
    let command_final: Vec<&str> = CommandStatus::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str())
        .collect();
    let mut violations = Vec::new();
    let mut found = |what: &str, rows: Vec<tokio_postgres::Row>| {
        let n = rows.len();
        for row in rows.iter().take(PER_CHECK) {
            violations.push(format!("{what}: {}", row.get::<_, String>(0)));
        }
        if n > PER_CHECK {
            violations.push(format!("{what}: ... {} more", n - PER_CHECK));
        }
    };

    let allowed: Option<(Vec<&str>, bool)> = match settled {
        Settled::AllTerminal => Some((terminal.clone(), false)),
        Settled::TerminalOrPending => Some((
            statuses(|s| s.is_terminal() || s == RunStatus::Pending),
            false,
        )),
        Settled::InFlight => Some((
            statuses(|s| s.is_terminal() || s == RunStatus::Pending),
            true,
        )),
        Settled::Any => None,
    };
    if let Some((allowed, leased_ok)) = allowed {
        let grace_ms = LEASE_GRACE.as_millis() as f64;
        let rows = db
            .query(
                "SELECT id::text || ' is ' || status || coalesce(', lease expired '
                        || round(extract(epoch FROM now() - lease_expires_at)::numeric, 1) || ' s ago', '')
                 FROM runs
                 WHERE NOT (status = ANY($1))
                   AND NOT ($2 AND status = ANY($3)
                            AND lease_expires_at > now() - make_interval(secs => $4::float8 / 1000))",
                &[&allowed, &leased_ok, &active, &grace_ms],
            )
            .await?;
        found(&format!("not settled ({settled:?})"), rows);
    }

    for (what, param, sql) in CHECKS {
        let rows = match param {
            Param::None => db.query(*sql, &[]).await?,
            Param::Terminal => db.query(*sql, &[&terminal]).await?,
            Param::Active => db.query(*sql, &[&active]).await?,
            Param::CommandFinal => db.query(*sql, &[&command_final]).await?,
        };
        found(what, rows);
    }
    found(
        "idempotency fingerprint does not match",
        fingerprint_violations(db).await?,
    );

    if !acked.is_empty() {
        // An acknowledgement covers every earlier one of its lease: keep the highest.
        let mut highest: BTreeMap<(Uuid, i64), i64> = BTreeMap::new();
        for a in acked {
            let seq = highest.entry((a.run_id, a.epoch)).or_default();
            *seq = (*seq).max(a.acked_runner_seq);
        }
        let run_ids: Vec<Uuid> = highest.keys().map(|(run, _)| *run).collect();
        let epochs: Vec<i64> = highest.keys().map(|(_, epoch)| *epoch).collect();
        let seqs: Vec<i64> = highest.values().copied().collect();
        let rows = db
            .query(
                // A coalesced or final run stores at most one event per runner event; its
                // progress under the current lease is the run's lease_runner_seq.
                "SELECT a.run_id::text || ' epoch ' || a.epoch || ': acknowledged up to runner_seq '
                        || a.acked || ' but ' || count(e.seq) || ' of those are stored'
                 FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS a(run_id, epoch, acked)
                 JOIN runs r ON r.id = a.run_id AND r.events_compacted_at IS NULL
                 LEFT JOIN events e ON e.run_id = a.run_id AND e.epoch = a.epoch
                                   AND e.runner_seq BETWEEN 1 AND a.acked
                 GROUP BY a.run_id, a.epoch, a.acked, r.stream_mode, r.lease_epoch, r.lease_runner_seq
                 HAVING CASE WHEN r.stream_mode = 'deltas' THEN count(e.seq) <> a.acked
                             ELSE count(e.seq) > a.acked
                                  OR (r.lease_epoch = a.epoch AND r.lease_runner_seq < a.acked) END",
                &[&run_ids, &epochs, &seqs],
            )
            .await?;
        found("acknowledged event missing", rows);
    }

    let mut summary = Summary::default();
    for row in db
        .query("SELECT status, count(*) FROM runs GROUP BY status", &[])
        .await?
    {
        let n: i64 = row.get(1);
        summary.runs += n;
        summary.by_status.insert(row.get(0), n);
    }
    summary.events = db
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    Ok((summary, violations))
}

/// Runs and commands whose stored fingerprint is not the hash of their own request, one
/// line each. The manager refuses a retry whose fingerprint differs from the stored one
/// (`ALREADY_EXISTS`) and answers one that matches with the first row, so a stored hash
/// that drifted from its row would refuse honest retries or accept conflicting ones.
///
/// The canonical text is rendered here, from the stored columns, exactly as the manager
/// renders the request (`NewRun::fingerprint`, `NewCommand::fingerprint`: serde_json's
/// compact rendering, maps with sorted keys), and PostgreSQL hashes it (`sha256`). JSON
/// read back from `jsonb` renders the same as what was written, except numbers that
/// `numeric` does not keep as written (`-0.0`, integral floats of 1e16 and more); no test
/// sends those.
async fn fingerprint_violations(
    db: &tokio_postgres::Client,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let mut what = Vec::new();
    let mut canonical = Vec::new();
    let mut stored: Vec<Option<Vec<u8>>> = Vec::new();
    for row in db
        .query(
            "SELECT id, project_id, session_id, backend_profile, input, queue, priority, labels,
                    max_attempts, queue_timeout_ms, run_timeout_ms, metadata, scheduled_at,
                    stream_mode, idempotency_key, request_hash, concurrency_key,
                    rerun_of_run_id, forked_from_run_id, forked_from_turn_id, context_run_id
             FROM runs",
            &[],
        )
        .await?
    {
        let hash: Option<Vec<u8>> = row.get("request_hash");
        let key: Option<String> = row.get("idempotency_key");
        // The schema lets request_hash be NULL; a keyed run must have one.
        if hash.is_none() && key.is_none() {
            continue;
        }
        what.push(format!(
            "run {} ({}): request_hash",
            row.get::<_, Uuid>("id"),
            key_text(key.as_deref())
        ));
        canonical.push(run_fingerprint_text(&row));
        stored.push(hash);
    }
    for row in db
        .query(
            "SELECT run_id, seq, kind, payload, delivery_policy, idempotency_key, payload_hash
             FROM commands",
            &[],
        )
        .await?
    {
        let key: Option<String> = row.get("idempotency_key");
        what.push(format!(
            "{}: command {} ({}): payload_hash",
            row.get::<_, Uuid>("run_id"),
            row.get::<_, i64>("seq"),
            key_text(key.as_deref())
        ));
        let rendered = json!([
            row.get::<_, &str>("kind"),
            row.get::<_, Value>("payload"),
            row.get::<_, Option<&str>>("delivery_policy"),
        ]);
        canonical.push(rendered.to_string());
        stored.push(Some(row.get("payload_hash")));
    }
    db.query(
        "SELECT t.what || ' is ' || coalesce(encode(t.stored, 'hex'), 'missing')
                || ', the hash of the row is ' || encode(sha256(convert_to(t.canonical, 'UTF8')), 'hex')
         FROM unnest($1::text[], $2::text[], $3::bytea[]) AS t(what, canonical, stored)
         WHERE t.stored IS DISTINCT FROM sha256(convert_to(t.canonical, 'UTF8'))
         ORDER BY t.what",
        &[&what, &canonical, &stored],
    )
    .await
}

fn key_text(key: Option<&str>) -> String {
    key.map_or_else(|| "no key".to_owned(), |k| format!("key {k:?}"))
}

/// The text a run's `request_hash` is the sha256 of, rebuilt from its row: the same
/// array, in the same order, as `NewRun::fingerprint` in `manager/src/store/runs.rs`.
fn run_fingerprint_text(row: &tokio_postgres::Row) -> String {
    let mut canonical = json!([
        row.get::<_, &str>("project_id"),
        row.get::<_, Option<Uuid>>("session_id")
            .map(|s| s.to_string()),
        row.get::<_, &str>("backend_profile"),
        row.get::<_, Value>("input"),
        row.get::<_, &str>("queue"),
        row.get::<_, i32>("priority"),
        row.get::<_, Vec<String>>("labels"),
        row.get::<_, i32>("max_attempts"),
        row.get::<_, Option<i64>>("queue_timeout_ms"),
        row.get::<_, Option<i64>>("run_timeout_ms"),
        row.get::<_, Value>("metadata"),
    ]);
    // Appended only when set, in microseconds since the Unix epoch (PostgreSQL keeps
    // microseconds, and the manager truncates to them before hashing).
    if let (Some(at), Value::Array(parts)) = (
        row.get::<_, Option<SystemTime>>("scheduled_at"),
        &mut canonical,
    ) {
        let micros = match at.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => after.as_micros() as i64,
            Err(before) => -(before.duration().as_micros() as i64),
        };
        parts.push(json!({ "scheduled_at_us": micros }));
    }
    // Appended only when not the default (`deltas`).
    let stream_mode = row.get::<_, &str>("stream_mode");
    if let (true, Value::Array(parts)) = (stream_mode != "deltas", &mut canonical) {
        parts.push(json!({ "stream_mode": stream_mode }));
    }
    // Appended only when set.
    if let (Some(key), Value::Array(parts)) = (
        row.get::<_, Option<&str>>("concurrency_key"),
        &mut canonical,
    ) {
        parts.push(json!({ "concurrency_key": key }));
    }
    // A re-run's or fork's origin (every such run has a context source).
    if let (Some(_), Value::Array(parts)) =
        (row.get::<_, Option<Uuid>>("context_run_id"), &mut canonical)
    {
        let id = |column: &str| row.get::<_, Option<Uuid>>(column).map(|id| id.to_string());
        let forked_from = id("forked_from_run_id").zip(id("forked_from_turn_id"));
        parts.push(json!({
            "rerun_of": id("rerun_of_run_id"),
            "forked_from": forked_from.map(|(run, turn)| [run, turn]),
        }));
    }
    canonical.to_string()
}

/// Waits until no run is left unended (or fails after `timeout`, naming what is left).
pub async fn wait_all_terminal(db: &tokio_postgres::Client, timeout: Duration) {
    wait_settled(db, Settled::AllTerminal, timeout).await
}

/// The runs in `statuses`, one line each: what a test that timed out waiting for them
/// needs to tell why nobody took them.
async fn describe_runs(db: &tokio_postgres::Client, statuses: &[&str]) -> String {
    let rows = db
        .query(
            "SELECT id::text, status, queue, backend_profile, labels, attempt,
                    lease_runner_id::text, last_event_seq
             FROM runs WHERE status = ANY($1) ORDER BY created_at LIMIT 20",
            &[&statuses],
        )
        .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                format!(
                    "  run {} {} queue={} profile={} labels={:?} attempt={} runner={:?} last_seq={}",
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, Vec<String>>(4),
                    r.get::<_, i32>(5),
                    r.get::<_, Option<String>>(6),
                    r.get::<_, i64>(7),
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(err) => format!("  (could not read the runs: {err})"),
    }
}

/// Waits until every run satisfies `settled` (`Any` returns at once).
pub async fn wait_settled(db: &tokio_postgres::Client, settled: Settled, timeout: Duration) {
    let open: Vec<&str> = match settled {
        Settled::AllTerminal => statuses(|s| !s.is_terminal()),
        Settled::TerminalOrPending => statuses(|s| RunStatus::ACTIVE.contains(&s)),
        Settled::InFlight | Settled::Any => return,
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = db
            .query(
                "SELECT status, count(*) FROM runs WHERE status = ANY($1) GROUP BY status ORDER BY status",
                &[&open],
            )
            .await;
        match left {
            Ok(rows) if rows.is_empty() => return,
            Ok(rows) if std::time::Instant::now() > deadline => {
                let left: Vec<String> = rows
                    .iter()
                    .map(|r| format!("{} {}", r.get::<_, i64>(1), r.get::<_, String>(0)))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for runs to settle ({settled:?}): {} left\n{}",
                    left.join(", "),
                    describe_runs(db, &open).await
                );
            }
            Err(err) if std::time::Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for runs to settle: {err}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
