//! Wake-ups: telling waiting runner streams, on this replica and on others, that there is
//! new work (runs became claimable) or new commands for a run they hold; and telling
//! every replica that an API key was revoked, so it drops the key from its cache and
//! ends the streams the key opened at once rather than when they next re-check it.
//!
//! Same-replica waiters are woken in memory at once. Other replicas hear about it through
//! PostgreSQL `NOTIFY`, coalesced: one `pg_notify` per replica every few milliseconds
//! naming what changed, sent on its own, never inside the claim / append / finish
//! transactions (NOTIFY takes a server-wide lock at commit and would serialise them).
//! Each replica keeps one `LISTEN` connection; when it (re)connects it wakes everything,
//! because notifications sent while it was away are lost. Waiters also poll slowly as a
//! safety net, so a lost wake-up costs latency, never correctness.
//!
//! The same NOTIFYs carry the ephemeral deltas of `final` runs to the watch hubs of the
//! other replicas (each whole delta that fits a NOTIFY payload; a larger one is not sent
//! there, and its run's stored `item.completed` still brings the text). They are
//! best-effort, like their fan-out: a replica that misses some misses only a preview.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentrun_shared::ids::RunId;
use deadpool_postgres::Pool;

use crate::db::Database;
use crate::store::events::{EventRecord, Producer};
use crate::store::runs;
use agentrun_shared::ids::RunnerId;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The channel every replica listens on.
const CHANNEL: &str = "agentrun_wakeups";
/// How long changes are gathered before one NOTIFY carries them.
const COALESCE: Duration = Duration::from_millis(5);
/// Ids per NOTIFY, well under the 8000-byte payload limit.
const IDS_PER_NOTIFY: usize = 150;
/// The largest NOTIFY payload PostgreSQL accepts is 8000 bytes; this leaves room for the
/// framing around the ephemeral events one carries.
const LIVE_BYTES_PER_NOTIFY: usize = 7_900;
/// Ephemeral events waiting for the next NOTIFY, at most (more are not sent to other
/// replicas: they are a preview, the stored log has the text).
const LIVE_BACKLOG: usize = 4_096;
/// Ephemeral events from other replicas buffered towards this replica's watch hub.
const LIVE_RELAY: usize = 4_096;
/// How long a revoked key id is remembered: longer than any key cache entry lives, so a
/// cached key revoked meanwhile is never trusted (after that, the database answers).
const REVOKED_KEY_MEMORY: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Outgoing {
    runs_created: bool,
    /// Runs with new commands (their holders and watchers wake).
    commands: HashSet<Uuid>,
    /// Runs or sessions with new events (their watchers wake).
    changed: HashSet<Uuid>,
    /// API keys revoked (every replica evicts them and re-checks its streams).
    keys: HashSet<Uuid>,
    /// Ephemeral events for other replicas' watchers, each rendered to fit a NOTIFY.
    live: Vec<String>,
}

/// The wake-ups of one watched run or session: each bumps `all`; those whose events
/// the watch hub has not fanned out yet also bump `unread` (what the hub's reader of a
/// run waits for, while a session watcher reads on any).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Wakes {
    pub all: u64,
    pub unread: u64,
}

impl Wakes {
    fn poke(&mut self) {
        self.all = self.all.wrapping_add(1);
        self.unread = self.unread.wrapping_add(1);
    }

    fn poke_fanned_out(&mut self) {
        self.all = self.all.wrapping_add(1);
    }
}

/// The wake-up hub of one manager replica.
pub struct Notifier {
    replica_id: Uuid,
    /// Bumped whenever runs may have become claimable.
    work: watch::Sender<u64>,
    /// The stream that holds each leased run on this replica.
    holders: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Watchers of a run's or session's events on this replica, by run or session id.
    watched: Mutex<HashMap<Uuid, watch::Sender<Wakes>>>,
    /// API keys revoked recently, here or on another replica, with when we heard.
    revoked_keys: Mutex<HashMap<Uuid, Instant>>,
    /// Bumped when a key was revoked (or revocations may have been missed).
    key_revocations: watch::Sender<u64>,
    outgoing: Mutex<Outgoing>,
    flush: Notify,
    /// Ephemeral events heard from other replicas, for this replica's watch hub.
    live_heard: broadcast::Sender<EventRecord>,
}

impl Notifier {
    pub fn new(replica_id: Uuid) -> Arc<Self> {
        Arc::new(Self {
            replica_id,
            work: watch::channel(0).0,
            holders: Mutex::default(),
            watched: Mutex::default(),
            revoked_keys: Mutex::default(),
            key_revocations: watch::channel(0).0,
            outgoing: Mutex::default(),
            flush: Notify::new(),
            live_heard: broadcast::channel(LIVE_RELAY).0,
        })
    }

    pub fn replica_id(&self) -> Uuid {
        self.replica_id
    }

    /// Runs were created, requeued or released: wake claimers everywhere.
    pub fn work_available(&self) {
        self.wake_work_locally();
        self.outgoing.lock().expect("notifier lock").runs_created = true;
        self.flush.notify_one();
    }

    /// New commands for these runs: wake the streams holding them, and their watchers,
    /// wherever they are.
    pub fn commands_added(&self, runs: &[RunId]) {
        let ids = runs.iter().map(|r| r.0);
        self.poke_holders(ids.clone());
        self.poke_watchers(ids.clone());
        self.outgoing
            .lock()
            .expect("notifier lock")
            .commands
            .extend(ids);
        self.flush.notify_one();
    }

    /// New events for these runs (or sessions): wake their watchers wherever they are.
    pub fn events_appended(&self, keys: impl IntoIterator<Item = Uuid>) {
        self.announce_appended(keys, Wakes::poke);
    }

    /// New events of these runs that this replica's watch hub already fanned out in
    /// memory ([`crate::api::watch_hub::WatchHub::publish_stored`]): wake their watchers
    /// everywhere, except this replica's hub readers, which have nothing left to read.
    pub fn events_appended_and_fanned_out(&self, runs: impl IntoIterator<Item = Uuid>) {
        self.announce_appended(runs, Wakes::poke_fanned_out);
    }

    /// Pokes this replica's watchers of `keys` with `poke` and tells the other replicas.
    fn announce_appended(&self, keys: impl IntoIterator<Item = Uuid>, poke: fn(&mut Wakes)) {
        let keys: Vec<Uuid> = keys.into_iter().collect();
        if keys.is_empty() {
            return;
        }
        self.poke_watchers_with(keys.iter().copied(), poke);
        self.outgoing
            .lock()
            .expect("notifier lock")
            .changed
            .extend(keys);
        self.flush.notify_one();
    }

    /// Ephemeral events (a `final` run's deltas) to pass to the other replicas' watch
    /// hubs: each that fits a NOTIFY, while the backlog has room.
    pub fn events_streamed_live(&self, events: &[EventRecord]) {
        let rendered: Vec<String> = events
            .iter()
            .map(|e| live_to_json(e).to_string())
            .filter(|text| text.len() <= LIVE_BYTES_PER_NOTIFY)
            .collect();
        if rendered.is_empty() {
            return;
        }
        {
            let mut outgoing = self.outgoing.lock().expect("notifier lock");
            let room = LIVE_BACKLOG.saturating_sub(outgoing.live.len());
            outgoing.live.extend(rendered.into_iter().take(room));
        }
        self.flush.notify_one();
    }

    /// Ephemeral events other replicas streamed (a receiver that lags loses some).
    pub fn subscribe_live(&self) -> broadcast::Receiver<EventRecord> {
        self.live_heard.subscribe()
    }

    /// API key `id` was revoked: tell this replica's streams and every other replica.
    pub fn key_revoked(&self, id: Uuid) {
        self.note_revoked([id]);
        self.outgoing.lock().expect("notifier lock").keys.insert(id);
        self.flush.notify_one();
    }

    /// Whether key `id` was revoked lately (a cached copy of it is not to be trusted).
    pub fn was_revoked(&self, id: Uuid) -> bool {
        self.revoked_keys
            .lock()
            .expect("notifier lock")
            .contains_key(&id)
    }

    /// A receiver that changes whenever a key was revoked (streams re-check theirs).
    pub fn subscribe_key_revocations(&self) -> watch::Receiver<u64> {
        self.key_revocations.subscribe()
    }

    fn note_revoked(&self, ids: impl IntoIterator<Item = Uuid>) {
        let now = Instant::now();
        {
            let mut revoked = self.revoked_keys.lock().expect("notifier lock");
            revoked.retain(|_, at| now.duration_since(*at) < REVOKED_KEY_MEMORY);
            revoked.extend(ids.into_iter().map(|id| (id, now)));
        }
        self.key_revocations.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever work may be available.
    pub fn subscribe_work(&self) -> watch::Receiver<u64> {
        self.work.subscribe()
    }

    /// A receiver that changes whenever the run or session `key` may have new events.
    pub fn watch(&self, key: Uuid) -> watch::Receiver<Wakes> {
        let mut watched = self.watched.lock().expect("notifier lock");
        // Forget topics nobody watches any more, so the map stays as small as the audience.
        watched.retain(|_, sender| sender.receiver_count() > 0);
        watched
            .entry(key)
            .or_insert_with(|| watch::channel(Wakes::default()).0)
            .subscribe()
    }

    /// Wakes this replica's watchers of `keys` (runs or sessions), telling no other
    /// replica: for what only this replica found out (its safety-net poll).
    pub fn wake_watchers_here(&self, keys: impl Iterator<Item = Uuid>) {
        self.poke_watchers(keys);
    }

    /// Routes command wake-ups for `run` to `holder` until [`Self::release`].
    pub fn hold(&self, run: RunId, holder: Arc<Notify>) {
        self.holders
            .lock()
            .expect("notifier lock")
            .insert(run.0, holder);
    }

    /// Stops routing `run`'s command wake-ups to `holder`. Keyed by the holder, not the
    /// run alone: when a runner reconnected to this replica, its old stream ending late
    /// must not unregister the new stream that holds the run now.
    pub fn release(&self, run: RunId, holder: &Arc<Notify>) {
        let mut holders = self.holders.lock().expect("notifier lock");
        if holders.get(&run.0).is_some_and(|h| Arc::ptr_eq(h, holder)) {
            holders.remove(&run.0);
        }
    }

    fn wake_work_locally(&self) {
        self.work.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn poke_holders(&self, runs: impl Iterator<Item = Uuid>) {
        let holders = self.holders.lock().expect("notifier lock");
        for run in runs {
            if let Some(holder) = holders.get(&run) {
                holder.notify_one();
            }
        }
    }

    fn poke_watchers(&self, keys: impl Iterator<Item = Uuid>) {
        self.poke_watchers_with(keys, Wakes::poke);
    }

    fn poke_watchers_with(&self, keys: impl Iterator<Item = Uuid>, poke: fn(&mut Wakes)) {
        let watched = self.watched.lock().expect("notifier lock");
        for key in keys {
            if let Some(sender) = watched.get(&key) {
                sender.send_modify(poke);
            }
        }
    }

    fn wake_everything(&self) {
        self.wake_work_locally();
        for holder in self.holders.lock().expect("notifier lock").values() {
            holder.notify_one();
        }
        for sender in self.watched.lock().expect("notifier lock").values() {
            sender.send_modify(Wakes::poke);
        }
        // A revocation may have been missed: streams re-check their keys.
        self.key_revocations.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies a wake-up from another replica.
    fn apply(&self, payload: &str) {
        let Ok(message) = serde_json::from_str::<Value>(payload) else {
            tracing::warn!(payload, "unreadable wake-up ignored");
            return;
        };
        if message["from"].as_str() == Some(self.replica_id.to_string().as_str()) {
            return;
        }
        if message["runs"].as_bool() == Some(true) {
            self.wake_work_locally();
        }
        let ids = |key: &str| -> Vec<Uuid> {
            message[key]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(|v| v.as_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let keys = ids("keys");
        if !keys.is_empty() {
            self.note_revoked(keys);
        }
        let commands = ids("commands");
        self.poke_holders(commands.iter().copied());
        self.poke_watchers(commands.into_iter().chain(ids("changed")));
        for event in message["live"].as_array().into_iter().flatten() {
            if let Some(event) = live_from_json(event) {
                // No receiver (nobody relays yet): nothing to do.
                let _ = self.live_heard.send(event);
            }
        }
    }

    /// The pending wake-ups as NOTIFY payloads of at most [`IDS_PER_NOTIFY`] ids each.
    fn take_outgoing(&self) -> Vec<String> {
        let taken = std::mem::take(&mut *self.outgoing.lock().expect("notifier lock"));
        let from = self.replica_id.to_string();
        let mut items: Vec<(&str, String)> = taken
            .commands
            .iter()
            .map(|id| ("commands", id.to_string()))
            .collect();
        items.extend(taken.changed.iter().map(|id| ("changed", id.to_string())));
        items.extend(taken.keys.iter().map(|id| ("keys", id.to_string())));
        let mut payloads = Vec::new();
        let mut runs_created = taken.runs_created;
        let mut chunks = items.chunks(IDS_PER_NOTIFY).peekable();
        while runs_created || chunks.peek().is_some() {
            let chunk = chunks.next().unwrap_or_default();
            let of = |kind: &str| -> Vec<&str> {
                chunk
                    .iter()
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, id)| id.as_str())
                    .collect()
            };
            payloads.push(
                json!({
                    "from": from,
                    "runs": runs_created,
                    "commands": of("commands"),
                    "changed": of("changed"),
                    "keys": of("keys"),
                })
                .to_string(),
            );
            runs_created = false;
        }
        // Ephemeral events go in NOTIFYs of their own, as many to one as fit.
        let mut batch: Vec<String> = Vec::new();
        let mut bytes = 0;
        for event in taken.live {
            if bytes + event.len() + 1 > LIVE_BYTES_PER_NOTIFY && !batch.is_empty() {
                payloads.push(live_payload(&from, &batch));
                batch.clear();
                bytes = 0;
            }
            bytes += event.len() + 1;
            batch.push(event);
        }
        if !batch.is_empty() {
            payloads.push(live_payload(&from, &batch));
        }
        payloads
    }
}

/// A NOTIFY payload carrying already-rendered ephemeral events.
fn live_payload(from: &str, events: &[String]) -> String {
    format!(r#"{{"from":"{from}","live":[{}]}}"#, events.join(","))
}

/// An ephemeral event as another replica reads it.
fn live_to_json(e: &EventRecord) -> Value {
    let (runner, epoch, runner_seq) = match e.producer {
        Producer::Runner {
            runner_id,
            epoch,
            runner_seq,
        } => (Some(runner_id.to_string()), epoch, runner_seq),
        Producer::Manager => (None, 0, 0),
    };
    let at_ms = e
        .created_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({"run": e.run_id.to_string(), "seq": e.seq, "type": e.event_type,
           "payload": e.payload_value(), "runner": runner, "epoch": epoch, "runner_seq": runner_seq,
           "at_ms": at_ms})
}

/// The inverse of [`live_to_json`]; `None` for anything else.
fn live_from_json(v: &Value) -> Option<EventRecord> {
    let producer = match v["runner"].as_str() {
        Some(id) => Producer::Runner {
            runner_id: RunnerId(id.parse().ok()?),
            epoch: v["epoch"].as_i64()?,
            runner_seq: v["runner_seq"].as_i64()?,
        },
        None => Producer::Manager,
    };
    Some(EventRecord {
        run_id: RunId(v["run"].as_str()?.parse().ok()?),
        seq: v["seq"].as_i64()?,
        event_type: v["type"].as_str()?.to_owned(),
        payload: v["payload"].to_string(),
        producer,
        created_at: std::time::UNIX_EPOCH + Duration::from_millis(v["at_ms"].as_u64()?),
        ephemeral: true,
    })
}

/// Announces to every replica that API key `id` was revoked, from outside a manager
/// (`agentrun-manager keys revoke`).
pub async fn announce_key_revoked(
    client: &impl deadpool_postgres::GenericClient,
    id: Uuid,
) -> Result<(), tokio_postgres::Error> {
    let payload = json!({"from": Uuid::new_v4().to_string(), "keys": [id.to_string()]});
    client
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &payload.to_string()],
        )
        .await?;
    Ok(())
}

/// Sends this replica's coalesced wake-ups to the others until `shutdown`.
pub async fn publish(notifier: Arc<Notifier>, pool: Pool, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = notifier.flush.notified() => {}
        }
        // Gather whatever else changes in the next few milliseconds into the same NOTIFY.
        tokio::time::sleep(COALESCE).await;
        for payload in notifier.take_outgoing() {
            let sent = async {
                let client = pool.get().await?;
                client
                    .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                    .await?;
                Ok::<_, crate::error::Error>(())
            };
            if let Err(err) = sent.await {
                // Other replicas fall back to polling; nothing is lost.
                tracing::warn!(error = %err, "could not publish a wake-up");
            }
        }
    }
}

/// The safety net for lost wake-ups, until `shutdown`: every `interval`, if some run is
/// claimable (pending, its `scheduled_at` reached — which no wake-up announces), this
/// replica's claimers are woken. One query per replica, however many runner streams.
pub async fn poll_work(
    notifier: Arc<Notifier>,
    pool: Pool,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let (notifier, pool) = (&notifier, &pool);
    crate::periodic::every(interval, shutdown, move || async move {
        let claimable = async {
            let client = pool.get().await?;
            runs::any_claimable(&client).await
        };
        match claimable.await {
            Ok(true) => notifier.wake_work_locally(),
            Ok(false) => {}
            Err(err) => tracing::debug!(error = %err, "work poll failed; retrying next tick"),
        }
    })
    .await
}

/// Listens for other replicas' wake-ups until `shutdown`, reconnecting as needed.
pub async fn listen(notifier: Arc<Notifier>, database: Database, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = listen_once(&notifier, &database, &shutdown);
        match session.await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, "wake-up listener lost its connection; reconnecting")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One LISTEN connection's life. Returns Ok on shutdown, Err when the connection broke.
async fn listen_once(
    notifier: &Notifier,
    database: &Database,
    shutdown: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = database.connect().await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&statement);
    // The connection must be polled for the LISTEN to complete.
    tokio::pin!(listen);
    loop {
        tokio::select! {
            done = &mut listen => { done?; break; }
            message = messages.next() => match message {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err),
                None => return Ok(()),
            },
        }
    }
    // Anything sent while we were not listening is lost: wake everyone to look.
    notifier.wake_everything();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => notifier.apply(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err),
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeups_are_coalesced_and_chunked() {
        let n = Notifier::new(Uuid::new_v4());
        n.work_available();
        let runs: Vec<RunId> = (0..200).map(|_| RunId::new()).collect();
        n.commands_added(&runs);
        n.commands_added(&runs[..10]);
        let payloads = n.take_outgoing();
        assert_eq!(payloads.len(), 2, "200 runs in chunks of {IDS_PER_NOTIFY}");
        let first: Value = serde_json::from_str(&payloads[0]).unwrap();
        assert_eq!(first["runs"], true);
        assert!(n.take_outgoing().is_empty());
    }

    #[test]
    fn foreign_wakeups_reach_the_holder_and_own_ones_are_ignored() {
        let a = Notifier::new(Uuid::new_v4());
        let b = Notifier::new(Uuid::new_v4());
        let run = RunId::new();
        let holder = Arc::new(Notify::new());
        b.hold(run, holder.clone());
        let work = b.subscribe_work();
        a.commands_added(&[run]);
        a.work_available();
        for payload in a.take_outgoing() {
            b.apply(&payload);
            a.apply(&payload);
        }
        assert!(work.has_changed().unwrap());
        // notify_one stored a permit for the holder.
        let woken = holder.notified();
        tokio::pin!(woken);
        assert!(woken.as_mut().enable());
    }

    #[test]
    fn ephemeral_events_reach_other_replicas_when_they_fit_a_notify() {
        let a = Notifier::new(Uuid::new_v4());
        let b = Notifier::new(Uuid::new_v4());
        let mut heard = b.subscribe_live();
        let run = RunId::new();
        let delta = |text: String| EventRecord {
            run_id: run,
            seq: 7,
            event_type: "content.delta".into(),
            payload: json!({"item_id": "m", "kind": "assistant_text", "delta": text}).to_string(),
            producer: Producer::Runner {
                runner_id: RunnerId(Uuid::new_v4()),
                epoch: 2,
                runner_seq: 9,
            },
            created_at: std::time::SystemTime::now(),
            ephemeral: true,
        };
        let small: Vec<EventRecord> = (0..40).map(|i| delta("x".repeat(300 + i))).collect();
        a.events_streamed_live(&small);
        a.events_streamed_live(&[delta("y".repeat(8_000))]);
        let payloads = a.take_outgoing();
        assert!(
            payloads.len() > 1,
            "40 deltas of ~400 bytes need several NOTIFYs"
        );
        assert!(
            payloads.iter().all(|p| p.len() < 8_000),
            "each fits a NOTIFY"
        );
        for payload in &payloads {
            b.apply(payload);
        }
        for sent in &small {
            let got = heard.try_recv().expect("each small delta arrives");
            assert_eq!((got.run_id, got.seq, &got.payload), (run, 7, &sent.payload));
            assert!(got.ephemeral);
            assert_eq!(got.producer, sent.producer);
        }
        assert!(
            heard.try_recv().is_err(),
            "the oversized delta was not sent"
        );
    }

    #[test]
    fn a_revoked_key_reaches_other_replicas() {
        let a = Notifier::new(Uuid::new_v4());
        let b = Notifier::new(Uuid::new_v4());
        let key = Uuid::new_v4();
        let revocations = b.subscribe_key_revocations();
        a.key_revoked(key);
        assert!(a.was_revoked(key));
        assert!(!b.was_revoked(key));
        for payload in a.take_outgoing() {
            b.apply(&payload);
        }
        assert!(b.was_revoked(key));
        assert!(revocations.has_changed().unwrap());
        assert!(!b.was_revoked(Uuid::new_v4()));
    }

    #[test]
    fn an_old_stream_ending_late_keeps_the_new_holder() {
        let n = Notifier::new(Uuid::new_v4());
        let run = RunId::new();
        let (old, new) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        n.hold(run, old.clone());
        // The runner reconnected: its new stream holds the run, then the old one ends.
        n.hold(run, new.clone());
        n.release(run, &old);
        n.commands_added(&[run]);
        let woken = new.notified();
        tokio::pin!(woken);
        assert!(woken.as_mut().enable(), "the new stream was not woken");
        n.release(run, &new);
        assert!(n.holders.lock().unwrap().is_empty());
    }
}
