//! The watch hub of one replica: what `WatchRun` costs follows the watched runs, not the
//! watchers.
//!
//! Each run watched on this replica has one *topic*: a reader task that tails the run's
//! log after a wake-up (an append on this replica, another replica's coalesced NOTIFY,
//! or the safety-net poll) and fans the events out in memory to the watchers *attached*
//! to it, into each watcher's byte-bounded outbox. One append is read once per replica,
//! however many watch it.
//!
//! An append on this replica is handed to the topic in memory as it is stored
//! ([`WatchHub::publish_stored`]) when it follows on from the topic's tail; the reader
//! then finds nothing new. One that comes while the tail is behind (another write came
//! between, which the reader is reading) waits in the topic, bounded, and goes out
//! right behind the reader's page that closes the gap: a topic whose reader once fell
//! behind does not go on reading back every append of a streaming run. Appends from
//! elsewhere are read.
//!
//! A watcher attaches only once it has read the log itself up to the topic's tail (its
//! cursor is at or past what the reader has fanned out), so the seam has no gap; the
//! reader skips what a watcher already has (seq at or below its cursor), so it has no
//! duplicate. A watcher whose outbox is full when an event comes is *detached* with its
//! cursor and reads from the database at its own pace until it catches up, then
//! attaches again: a stalled client holds back nobody, and what it holds stays bounded by
//! its outbox. An attached watcher that nothing happens to costs nothing.
//!
//! Ephemeral events (a `final` run's deltas, never stored) are offered to the topic
//! directly, by the append on this replica ([`WatchHub::publish_live`]) or relayed from
//! another replica's NOTIFY ([`relay_live`]). Each carries the seq of the stored event
//! it follows and reaches only the watchers whose cursor is exactly there, so it lands
//! between that event and the next one; one whose stored event the reader has not read
//! yet waits in the topic (bounded) until it has. They are best-effort: one that finds a
//! watcher's outbox full, or its place already passed, is dropped, never detaching
//! anybody (the stored `item.completed` carries the whole text).
//!
//! The safety net for lost wake-ups is one query per replica and interval
//! ([`poll`]): the watched runs' `last_event_seq`, waking only the readers whose run
//! moved past their tail. A topic whose last watcher leaves ends with its reader.
//!
//! `WatchSession` streams read their session's log themselves after a wake-up (an
//! append to one of its runs, a new run of the session); the hub only keeps the
//! safety net for them: the same poll reads, for every session watched on the replica,
//! a mark of its runs' logs (the sum of their `last_event_seq`) and wakes the watchers
//! of the sessions whose mark moved. An idle session watcher costs nothing either.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentrun_shared::ids::{RunId, SessionId};
use agentrun_shared::proto;
use deadpool_postgres::Pool;
use prost::Message;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::convert;
use super::watch::{self, BUFFER_BYTES, Outbox, TrySend};
use crate::error::Result;
use crate::notify::Notifier;
use crate::store::{Tenant, events, runs, sessions};

/// Events the reader reads per page (pages are bounded by bytes too, in the store).
const PAGE: i64 = 500;
/// Ephemeral events a topic holds while its reader catches up with the stored events
/// they follow, by count and by encoded bytes (one watcher's buffer); more are dropped.
const LIVE_WAITING: usize = 1024;
const LIVE_WAITING_BYTES: usize = BUFFER_BYTES;
/// Stored events of this replica's appends a topic holds while its reader closes the gap
/// before them, by count and by payload bytes (one watcher's buffer); an append that
/// does not fit is left to the reader.
const PARKED: usize = 4096;
const PARKED_BYTES: usize = BUFFER_BYTES;

/// Why a watcher is no longer attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// It missed events after `cursor` (its outbox was full, or the reader stopped): it
    /// reads on from the database.
    Behind { cursor: i64 },
    /// It was sent `run.terminal`: its stream ends.
    Ended,
}

/// The watch hub of one replica (see the module doc).
pub struct WatchHub {
    pool: Pool,
    notifier: Arc<Notifier>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    topics: Mutex<HashMap<RunId, Topic>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Sessions followed on this replica, for the safety-net poll.
    sessions: Mutex<HashMap<(Tenant, SessionId), WatchedSession>>,
}

struct WatchedSession {
    watchers: usize,
    /// The mark the last poll found; `None` until the first poll, which wakes the
    /// watchers once (events may have come between their first read and it).
    mark: Option<i64>,
}

/// A `WatchSession` stream's registration for the safety-net poll; dropping it ends it.
pub struct SessionWatch {
    hub: Arc<WatchHub>,
    key: (Tenant, SessionId),
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        let mut sessions = self.hub.sessions.lock().expect("watch hub lock");
        if let Entry::Occupied(mut watched) = sessions.entry(self.key.clone()) {
            watched.get_mut().watchers -= 1;
            if watched.get().watchers == 0 {
                watched.remove();
            }
        }
    }
}

struct Topic {
    /// Every event up to this seq was read and offered to the attached watchers.
    tail: i64,
    subscribers: Vec<Subscriber>,
    /// Wakes the reader: the safety-net poll saw the run move, or a watcher left.
    poke: Arc<Notify>,
    /// Ephemeral events following a stored event past `tail`, in order.
    live_waiting: VecDeque<proto::Event>,
    /// Their encoded bytes.
    live_waiting_bytes: usize,
    /// Stored events of appends here that came while `tail` was behind them, in seq order
    /// (see [`WatchHub::publish_stored`]).
    parked: VecDeque<events::EventRecord>,
    /// Their payload bytes.
    parked_bytes: usize,
}

impl Topic {
    fn new(tail: i64, poke: Arc<Notify>) -> Self {
        Topic {
            tail,
            subscribers: Vec::new(),
            poke,
            live_waiting: VecDeque::new(),
            live_waiting_bytes: 0,
            parked: VecDeque::new(),
            parked_bytes: 0,
        }
    }

    /// Holds `run` (an append's events, in seq order, past `tail + 1`) until the reader
    /// has read up to it, if it continues what is held and fits; whether it did.
    fn park(&mut self, run: Vec<events::EventRecord>) -> bool {
        let continues = self
            .parked
            .back()
            .is_none_or(|last| last.seq + 1 == run[0].seq);
        let bytes: usize = run.iter().map(|e| e.payload.len()).sum();
        if !continues
            || self.parked.len() + run.len() > PARKED
            || self.parked_bytes + bytes > PARKED_BYTES
        {
            return false;
        }
        self.parked_bytes += bytes;
        self.parked.extend(run);
        true
    }

    /// Appends to `page` (ending at `last_seq`) the parked events that follow it without
    /// a gap, and drops those it already holds.
    fn unpark_after(&mut self, last_seq: i64, page: &mut Vec<events::EventRecord>) {
        let mut last_seq = last_seq;
        while let Some(first) = self.parked.front()
            && first.seq <= last_seq + 1
        {
            let event = self.parked.pop_front().expect("checked");
            self.parked_bytes -= event.payload.len();
            if event.seq == last_seq + 1 {
                last_seq = event.seq;
                page.push(event);
            }
        }
    }
}

struct Subscriber {
    id: u64,
    /// The last seq queued to this watcher.
    cursor: i64,
    outbox: Outbox<proto::Event>,
    left: Option<oneshot::Sender<Left>>,
}

impl Drop for Subscriber {
    /// Whoever removes a subscriber without saying why leaves it behind at its cursor, so
    /// no path (a full outbox, a failed read, shutdown) can lose its place.
    fn drop(&mut self) {
        if let Some(left) = self.left.take() {
            let _ = left.send(Left::Behind {
                cursor: self.cursor,
            });
        }
    }
}

/// A watcher's place in its run's topic; dropping it detaches the watcher.
pub struct Attachment {
    hub: Arc<WatchHub>,
    run_id: RunId,
    id: u64,
    left: oneshot::Receiver<Left>,
}

impl Attachment {
    /// Resolves when the watcher was detached, saying why.
    pub async fn left(&mut self) -> Left {
        // The sender is consumed only by sending (see `Subscriber::drop`).
        (&mut self.left).await.unwrap_or(Left::Ended)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut topics = self.hub.topics.lock().expect("watch hub lock");
        if let Some(topic) = topics.get_mut(&self.run_id) {
            topic.subscribers.retain(|s| s.id != self.id);
            if topic.subscribers.is_empty() {
                // The reader ends the topic.
                topic.poke.notify_one();
            }
        }
    }
}

impl WatchHub {
    pub fn new(
        pool: Pool,
        notifier: Arc<Notifier>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            notifier,
            shutdown,
            tasks,
            topics: Mutex::default(),
            next_id: Default::default(),
            sessions: Mutex::default(),
        })
    }

    /// Registers a `WatchSession` stream of `session` for the safety-net poll, which
    /// wakes it (through the notifier, on the session's key) when the session's logs
    /// moved.
    pub(super) fn watch_session(
        self: &Arc<Self>,
        tenant: Tenant,
        session: SessionId,
    ) -> SessionWatch {
        let key = (tenant, session);
        self.sessions
            .lock()
            .expect("watch hub lock")
            .entry(key.clone())
            .or_insert(WatchedSession {
                watchers: 0,
                mark: None,
            })
            .watchers += 1;
        SessionWatch {
            hub: self.clone(),
            key,
        }
    }

    /// Wakes the watchers of the sessions whose mark moved since the last poll.
    fn wake_moved_sessions(&self, marks: Vec<((Tenant, SessionId), i64)>) {
        let mut moved = Vec::new();
        {
            let mut sessions = self.sessions.lock().expect("watch hub lock");
            for (key, mark) in marks {
                if let Some(watched) = sessions.get_mut(&key)
                    && watched.mark.replace(mark) != Some(mark)
                {
                    moved.push(key.1.0);
                }
            }
        }
        self.notifier.wake_watchers_here(moved.into_iter());
    }

    /// Attaches a watcher that has read `run_id`'s log up to `cursor`, sending into
    /// `outbox` from the next event on. `None` when the topic's reader is already past
    /// `cursor`: the watcher reads the database again first.
    pub(super) fn attach(
        self: &Arc<Self>,
        run_id: RunId,
        cursor: i64,
        outbox: &Outbox<proto::Event>,
    ) -> Option<Attachment> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (left_tx, left) = oneshot::channel();
        let subscriber = || Subscriber {
            id,
            cursor,
            outbox: outbox.clone(),
            left: Some(left_tx),
        };
        let mut topics = self.topics.lock().expect("watch hub lock");
        match topics.entry(run_id) {
            Entry::Occupied(mut topic) => {
                let topic = topic.get_mut();
                if cursor < topic.tail {
                    return None;
                }
                topic.subscribers.push(subscriber());
            }
            Entry::Vacant(vacant) => {
                let poke = Arc::new(Notify::new());
                let topic = vacant.insert(Topic::new(cursor, poke.clone()));
                topic.subscribers.push(subscriber());
                // Tracked: shutdown waits for readers too.
                self.tasks.spawn(read(self.clone(), run_id, poke));
            }
        }
        Some(Attachment {
            hub: self.clone(),
            run_id,
            id,
            left,
        })
    }

    /// The topic's tail, or `None` once nobody is attached (the topic is then removed
    /// and its reader ends).
    fn tail_or_close(&self, run_id: RunId) -> Option<i64> {
        let mut topics = self.topics.lock().expect("watch hub lock");
        let topic = topics.get(&run_id)?;
        if topic.subscribers.is_empty() {
            topics.remove(&run_id);
            return None;
        }
        Some(topic.tail)
    }

    /// Removes the topic; its watchers are left behind at their cursors.
    fn close(&self, run_id: RunId) {
        let topic = self.topics.lock().expect("watch hub lock").remove(&run_id);
        drop(topic);
    }

    /// Offers `page` (stored events in seq order) to every attached watcher, from the
    /// topic's tail on: what the tail already passed was fanned out before. Returns
    /// whether the run ended (the topic is then closed).
    fn fan_out(&self, run_id: RunId, mut page: Vec<events::EventRecord>) -> bool {
        let mut topics = self.topics.lock().expect("watch hub lock");
        let Some(topic) = topics.get_mut(&run_id) else {
            return true;
        };
        let new = page.partition_point(|e| e.seq <= topic.tail);
        page.drain(..new);
        let last_read = page.last().map_or(topic.tail, |e| e.seq);
        topic.unpark_after(last_read, &mut page);
        let Some(last_seq) = page.last().map(|e| e.seq) else {
            return false;
        };
        let ended = page.iter().any(|e| e.event_type == "run.terminal");
        // Each stored event, followed by the ephemeral ones waiting for it.
        let mut converted: Vec<proto::Event> = Vec::with_capacity(page.len());
        let mut ids = convert::WireIds::default();
        for event in page {
            let seq = event.seq;
            converted.push(ids.event(event));
            while topic.live_waiting.front().is_some_and(|l| l.seq <= seq) {
                let live = topic.live_waiting.pop_front().expect("checked");
                topic.live_waiting_bytes -= live.encoded_len();
                if live.seq == seq {
                    converted.push(live);
                }
            }
        }
        topic.tail = last_seq;
        let mut detached = Vec::new();
        // Each watcher but the last gets copies; the last (usually the only one) takes
        // the events themselves.
        let watchers = std::mem::take(&mut topic.subscribers);
        let count = watchers.len();
        for (i, mut subscriber) in watchers.into_iter().enumerate() {
            let attached = if i + 1 < count {
                offer(&mut subscriber, converted.iter().map(Cow::Borrowed))
            } else {
                offer(
                    &mut subscriber,
                    std::mem::take(&mut converted).into_iter().map(Cow::Owned),
                )
            };
            if attached {
                topic.subscribers.push(subscriber);
            }
        }
        if ended {
            for mut subscriber in topic.subscribers.drain(..) {
                if let Some(left) = subscriber.left.take() {
                    let _ = left.send(Left::Ended);
                }
                detached.push(subscriber);
            }
            topics.remove(&run_id);
        }
        drop(topics);
        drop(detached);
        ended
    }

    /// Offers events this replica just stored (each run's in seq order) to their runs'
    /// watchers here, so its reader, woken by the same append, finds nothing left to
    /// read: a local append reaches local watchers without reading it back. Events that
    /// follow the topic's tail go out at once. Events past a gap (another write came
    /// between, and its wake-up has the reader read it) are parked in the topic and go
    /// out behind the reader's page that closes the gap; those that do not fit are left
    /// to the reader.
    ///
    /// Returns the runs whose events were all taken here (to be announced with
    /// [`Notifier::events_appended_and_fanned_out`]).
    pub fn publish_stored(&self, stored: Vec<events::EventRecord>) -> Vec<uuid::Uuid> {
        let mut taken = Vec::new();
        // Runs with an append left to the reader: its wake-up must not be skipped.
        let mut left = HashSet::new();
        // Each run's events taken in order, each event moved at most once: one run's
        // append (the usual case) is the whole vector, moved, not copied. (Splitting a
        // vector moved the events behind each run again, for every run.)
        let mut stored = VecDeque::from(stored);
        while let Some(run_id) = stored.front().map(|e| e.run_id) {
            let len = stored.iter().take_while(|e| e.run_id == run_id).count();
            let mut run: Vec<_> = if len == stored.len() {
                std::mem::take(&mut stored).into()
            } else {
                stored.drain(..len).collect()
            };
            let (follows, taken_here) = {
                let mut topics = self.topics.lock().expect("watch hub lock");
                match topics.get_mut(&run_id) {
                    Some(topic) if topic.tail + 1 == run[0].seq => (true, true),
                    Some(topic) if topic.tail + 1 < run[0].seq => {
                        (false, topic.park(std::mem::take(&mut run)))
                    }
                    // Nobody watches it here, or the reader already passed it.
                    _ => (false, false),
                }
            };
            if follows {
                self.fan_out(run_id, run);
            }
            if taken_here {
                taken.push(run_id.0);
            } else {
                left.insert(run_id.0);
            }
        }
        taken.retain(|run| !left.contains(run));
        taken.sort_unstable();
        taken.dedup();
        taken
    }

    /// Offers ephemeral events of this replica's appends to their runs' watchers here,
    /// and passes them on to the other replicas.
    pub fn publish_live(&self, events: &[events::EventRecord]) {
        if events.is_empty() {
            return;
        }
        self.offer_live(events);
        self.notifier.events_streamed_live(events);
    }

    /// Offers ephemeral events (in order) to the attached watchers of their runs: at
    /// once to those at their place, later to those the reader has not brought there yet.
    fn offer_live(&self, events: &[events::EventRecord]) {
        let mut topics = self.topics.lock().expect("watch hub lock");
        for event in events {
            let Some(topic) = topics.get_mut(&event.run_id) else {
                continue; // nobody watches it here
            };
            if event.seq > topic.tail {
                let live = convert::event(event.clone());
                let bytes = live.encoded_len();
                if topic.live_waiting.len() < LIVE_WAITING
                    && topic.live_waiting_bytes + bytes <= LIVE_WAITING_BYTES
                {
                    topic.live_waiting_bytes += bytes;
                    topic.live_waiting.push_back(live);
                }
                continue;
            }
            // Older than the tail: its place has passed, the stored text follows anyway.
            if event.seq == topic.tail {
                let event = convert::event(event.clone());
                for subscriber in &mut topic.subscribers {
                    offer_live(subscriber, &event);
                }
            }
        }
    }

    /// Wakes the readers of runs that `seqs` (run, last_event_seq) show past their tail.
    fn wake_moved(&self, seqs: &[(RunId, i64)]) {
        let topics = self.topics.lock().expect("watch hub lock");
        for (run_id, last) in seqs {
            if let Some(topic) = topics.get(run_id)
                && *last > topic.tail
            {
                topic.poke.notify_one();
            }
        }
    }
}

/// Offers a watcher the events of a fan-out, in order, queued as one item; returns
/// whether it stays attached: one that falls behind (its buffer cannot take the next
/// event) detaches and reads on from the database at its cursor, one whose client went
/// away ends on its own. An ephemeral event goes only where the watcher is exactly at
/// its place, and only with room; it is dropped otherwise, never detaching anybody.
fn offer<'a>(
    subscriber: &mut Subscriber,
    events: impl Iterator<Item = Cow<'a, proto::Event>>,
) -> bool {
    let room = subscriber.outbox.room_now();
    let (mut batch, mut bytes, mut cursor) = (Vec::new(), 0, subscriber.cursor);
    let mut attached = true;
    for event in events {
        if !event.ephemeral && event.seq <= cursor {
            continue;
        }
        let size = watch::room_for(event.as_ref());
        let fits = bytes + size <= room;
        if event.ephemeral {
            if fits && event.seq == cursor {
                bytes += size;
                batch.push(event.into_owned());
            }
            continue;
        }
        if !fits {
            attached = false;
            break;
        }
        bytes += size;
        cursor = event.seq;
        batch.push(event.into_owned());
    }
    if !batch.is_empty() {
        match subscriber.outbox.try_send_all(batch, bytes) {
            TrySend::Sent => subscriber.cursor = cursor,
            TrySend::Full | TrySend::Closed => return false,
        }
    }
    attached
}

/// Queues an ephemeral event to a watcher that is exactly at its place (its cursor is
/// the stored event it follows), if there is room; dropped otherwise.
fn offer_live(subscriber: &mut Subscriber, event: &proto::Event) {
    if subscriber.cursor == event.seq {
        let _ = subscriber.outbox.try_send(event.clone());
    }
}

/// Feeds the ephemeral events other replicas streamed (heard through the notifier) to
/// this replica's watchers, until `shutdown`. A burst the relay cannot keep up with is
/// skipped, as any ephemeral event may be.
pub async fn relay_live(hub: Arc<WatchHub>, shutdown: CancellationToken) {
    let mut heard = hub.notifier.subscribe_live();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = heard.recv() => event,
        };
        match event {
            Ok(event) => hub.offer_live(std::slice::from_ref(&event)),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "ephemeral events from other replicas skipped");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// One topic's reader: tails `run_id`'s log after each wake-up until nobody watches it,
/// the run ends, or the manager shuts down.
async fn read(hub: Arc<WatchHub>, run_id: RunId, poke: Arc<Notify>) {
    let mut woken = hub.notifier.watch(run_id.0);
    loop {
        // Mark the wake-ups seen before reading, so one that lands during the read is
        // not lost. The first pass reads at once: an append between the first watcher's
        // own read and this subscription woke nobody.
        let unread = woken.borrow_and_update().unread;
        let Some(tail) = hub.tail_or_close(run_id) else {
            return;
        };
        let page = async {
            let client = hub.pool.get().await?;
            events::list(&client, run_id, tail, PAGE).await
        };
        match page.await {
            Ok(page) => {
                let full = page.len() as i64 == PAGE;
                if hub.fan_out(run_id, page) {
                    return;
                }
                if full {
                    continue;
                }
            }
            Err(err) => {
                // Its watchers read on from the database themselves (and meet the error
                // there, if it lasts).
                tracing::debug!(error = %err, %run_id, "watch reader failed; watchers read on alone");
                hub.close(run_id);
                return;
            }
        }
        loop {
            tokio::select! {
                // An error (the notifier went away) disables the branch; pokes still come.
                Ok(()) = woken.changed() => {
                    // Appends this replica fanned out in memory leave nothing to read.
                    if woken.borrow_and_update().unread != unread {
                        break;
                    }
                }
                _ = poke.notified() => break,
                _ = hub.shutdown.cancelled() => {
                    hub.close(run_id);
                    return;
                }
            }
        }
    }
}

/// The safety net for lost wake-ups, until `shutdown`: every `interval`, one query reads
/// the watched runs' last seqs and wakes the readers whose run moved, and one the
/// watched sessions' marks (see the module doc). Nothing when nothing is watched.
pub async fn poll(hub: Arc<WatchHub>, interval: Duration, shutdown: CancellationToken) {
    let hub = &hub;
    crate::periodic::every(interval, shutdown, move || async move {
        poll_sessions(hub).await;
        poll_runs(hub).await;
    })
    .await
}

/// The run half of [`poll`].
async fn poll_runs(hub: &WatchHub) {
    let watched: Vec<RunId> = hub
        .topics
        .lock()
        .expect("watch hub lock")
        .keys()
        .copied()
        .collect();
    if watched.is_empty() {
        return;
    }
    let seqs = async {
        let client = hub.pool.get().await?;
        runs::last_event_seqs(&client, &watched).await
    };
    let seqs: Result<_> = seqs.await;
    match seqs {
        Ok(seqs) => hub.wake_moved(&seqs),
        Err(err) => tracing::debug!(error = %err, "watch poll failed; retrying next tick"),
    }
}

/// The session half of [`poll`].
async fn poll_sessions(hub: &WatchHub) {
    let watched: Vec<(Tenant, SessionId)> = hub
        .sessions
        .lock()
        .expect("watch hub lock")
        .keys()
        .cloned()
        .collect();
    if watched.is_empty() {
        return;
    }
    let marks = async {
        let client = hub.pool.get().await?;
        sessions::log_marks(&client, &watched).await
    };
    let marks: Result<_> = marks.await;
    match marks {
        Ok(marks) => hub.wake_moved_sessions(marks),
        Err(err) => tracing::debug!(error = %err, "session watch poll failed; retrying next tick"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use futures_util::StreamExt;
    use uuid::Uuid;

    use super::super::watch::WatchStream;
    use super::*;
    use crate::store::events::{EventRecord, Producer};

    /// A hub whose database is never reached: the tests drive topics by hand.
    fn hub() -> Arc<WatchHub> {
        let pool = crate::db::pool("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
        WatchHub::new(
            pool,
            Notifier::new(Uuid::new_v4()),
            CancellationToken::new(),
            TaskTracker::new(),
        )
    }

    /// One-byte deltas of `run_id` with `seqs`.
    fn deltas(run_id: RunId, seqs: std::ops::RangeInclusive<i64>) -> Vec<EventRecord> {
        seqs.map(|seq| record(run_id, seq, "content.delta", 1))
            .collect()
    }

    fn record(run_id: RunId, seq: i64, event_type: &str, bytes: usize) -> EventRecord {
        EventRecord {
            run_id,
            seq,
            event_type: event_type.into(),
            payload: serde_json::json!({ "text": "x".repeat(bytes) }).to_string(),
            producer: Producer::Manager,
            created_at: SystemTime::now(),
            ephemeral: false,
        }
    }

    /// Attaches a subscriber by hand (no reader task), as `attach` would.
    fn subscribe(
        hub: &Arc<WatchHub>,
        run_id: RunId,
        cursor: i64,
    ) -> (Attachment, WatchStream<proto::Event>) {
        let (outbox, stream) = Outbox::new();
        let id = hub
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (left_tx, left) = oneshot::channel();
        let mut topics = hub.topics.lock().unwrap();
        let topic = topics
            .entry(run_id)
            .or_insert_with(|| Topic::new(cursor, Arc::default()));
        topic.subscribers.push(Subscriber {
            id,
            cursor,
            outbox,
            left: Some(left_tx),
        });
        let attachment = Attachment {
            hub: hub.clone(),
            run_id,
            id,
            left,
        };
        (attachment, stream)
    }

    async fn seqs(stream: &mut WatchStream<proto::Event>, n: usize) -> Vec<i64> {
        let mut seqs = Vec::new();
        for _ in 0..n {
            seqs.push(stream.next().await.unwrap().unwrap().seq);
        }
        seqs
    }

    #[tokio::test]
    async fn a_page_reaches_each_watcher_once_from_its_own_cursor() {
        let hub = hub();
        let run = RunId::new();
        let (_a, mut a) = subscribe(&hub, run, 0);
        let (_b, mut b) = subscribe(&hub, run, 2);
        let page: Vec<_> = (1..=4)
            .map(|seq| record(run, seq, "content.delta", 1))
            .collect();
        assert!(!hub.fan_out(run, page));
        assert_eq!(seqs(&mut a, 4).await, [1, 2, 3, 4]);
        assert_eq!(
            seqs(&mut b, 2).await,
            [3, 4],
            "nothing at or below its cursor"
        );
        assert_eq!(hub.topics.lock().unwrap()[&run].tail, 4);
    }

    /// The hub's database is unreachable here: what the watcher gets came from memory.
    #[tokio::test]
    async fn a_local_append_reaches_watchers_in_memory_when_it_follows_the_tail() {
        let hub = hub();
        let run = RunId::new();
        let (_a, mut a) = subscribe(&hub, run, 2);
        let events = |seqs| deltas(run, seqs);
        let tail = |hub: &Arc<WatchHub>| hub.topics.lock().unwrap()[&run].tail;

        assert_eq!(hub.publish_stored(events(3..=5)), [run.0]);
        assert_eq!(seqs(&mut a, 3).await, [3, 4, 5]);
        assert_eq!(tail(&hub), 5);
        // Past a gap (6 was stored by another write, whose wake-up has the reader read
        // it): held in the topic, and taken (the reader need not read it).
        assert_eq!(hub.publish_stored(events(7..=8)), [run.0]);
        assert_eq!(tail(&hub), 5, "nothing skipped");
        // The reader's page (read from an older tail) closes the gap: the held events
        // follow it, and what it repeats is not sent again.
        assert!(!hub.fan_out(run, events(4..=6)));
        assert_eq!(seqs(&mut a, 3).await, [6, 7, 8]);
        assert_eq!(tail(&hub), 8);
        // A page that already holds them sends nothing twice either.
        assert!(hub.publish_stored(events(10..=10)).contains(&run.0));
        assert!(!hub.fan_out(run, events(9..=10)));
        assert_eq!(seqs(&mut a, 2).await, [9, 10]);
        assert!(hub.topics.lock().unwrap()[&run].parked.is_empty());
    }

    /// One write's events of several runs, one run's in two stretches (its append, then
    /// what its end stored after another run's append): each run's reach its watchers in
    /// order, from memory.
    #[tokio::test]
    async fn one_write_of_several_runs_reaches_each_runs_watchers_in_order() {
        let hub = hub();
        let (one, two) = (RunId::new(), RunId::new());
        let (_a, mut a) = subscribe(&hub, one, 2);
        let (_b, mut b) = subscribe(&hub, two, 0);
        let mut stored = deltas(one, 3..=4);
        stored.extend(deltas(two, 1..=2));
        stored.extend(deltas(one, 5..=6));
        let mut taken = hub.publish_stored(stored);
        taken.sort();
        let mut both = vec![one.0, two.0];
        both.sort();
        assert_eq!(taken, both);
        assert_eq!(seqs(&mut a, 4).await, [3, 4, 5, 6]);
        assert_eq!(seqs(&mut b, 2).await, [1, 2]);
        assert!(
            hub.topics.lock().unwrap()[&one].parked.is_empty(),
            "nothing parked"
        );
    }

    /// What the topic cannot hold is left to the reader, and its run is not reported
    /// taken, so the reader is woken for it.
    #[tokio::test]
    async fn an_append_the_topic_cannot_hold_is_left_to_the_reader() {
        let hub = hub();
        let run = RunId::new();
        let (_a, _rx) = subscribe(&hub, run, 2);
        let events = |seqs| deltas(run, seqs);
        assert_eq!(hub.publish_stored(events(4..=5)), [run.0]);
        // Not continuing what is held (7 is missing too).
        let unwatched = record(RunId::new(), 1, "content.delta", 1);
        let mut stored = events(6..=6);
        stored.push(unwatched);
        stored.extend(events(8..=8));
        assert_eq!(
            hub.publish_stored(stored),
            Vec::<uuid::Uuid>::new(),
            "one of the run's appends was left, and nobody watches the other run"
        );
        // Too large to hold.
        let big = record(run, 7, "content.delta", PARKED_BYTES);
        assert!(hub.publish_stored(vec![big]).is_empty());
        let topics = hub.topics.lock().unwrap();
        let held: Vec<i64> = topics[&run].parked.iter().map(|e| e.seq).collect();
        assert_eq!(held, [4, 5, 6]);
    }

    #[tokio::test]
    async fn a_full_outbox_detaches_only_its_watcher_at_its_cursor() {
        let hub = hub();
        let run = RunId::new();
        let (mut stalled, _never_read) = subscribe(&hub, run, 0);
        let (mut reader, mut read) = subscribe(&hub, run, 0);
        // Each event is a quarter of a watcher's buffer: the fourth one no longer fits.
        let big = BUFFER_BYTES / 4;
        for seq in 1..=6 {
            hub.fan_out(run, vec![record(run, seq, "content.delta", big)]);
            assert_eq!(seqs(&mut read, 1).await, [seq], "the reader is held back");
        }
        assert_eq!(stalled.left().await, Left::Behind { cursor: 3 });
        // A watcher behind the tail cannot attach; one at it can.
        let (outbox, _stream) = Outbox::new();
        assert!(hub.attach(run, 3, &outbox).is_none());
        // (Its reader task, which would fail to reach the database, cannot run before
        // the next line: the test's runtime has one thread and nothing awaits between.)
        assert!(hub.attach(run, 6, &outbox).is_some());
        hub.fan_out(run, vec![record(run, 7, "run.terminal", 1)]);
        assert_eq!(reader.left().await, Left::Ended);
        assert!(
            hub.topics.lock().unwrap().is_empty(),
            "an ended run has no topic"
        );
    }

    fn live(run_id: RunId, follows: i64, text: &str) -> EventRecord {
        EventRecord {
            ephemeral: true,
            ..record(run_id, follows, "content.delta", 0)
        }
        .with_text(text)
    }

    impl EventRecord {
        fn with_text(mut self, text: &str) -> Self {
            self.payload = serde_json::json!({ "delta": text }).to_string();
            self
        }
    }

    async fn next(stream: &mut WatchStream<proto::Event>) -> (i64, bool) {
        let e = stream.next().await.unwrap().unwrap();
        (e.seq, e.ephemeral)
    }

    #[tokio::test]
    async fn ephemeral_events_land_right_after_the_stored_event_they_follow() {
        let hub = hub();
        let run = RunId::new();
        let (_a, mut a) = subscribe(&hub, run, 2);
        // At the tail: at once. Past it: once the reader has fanned out seq 3, before 4.
        // Before it: dropped.
        hub.offer_live(&[
            live(run, 2, "now"),
            live(run, 3, "later"),
            live(run, 1, "stale"),
        ]);
        hub.fan_out(
            run,
            vec![
                record(run, 3, "item.started", 1),
                record(run, 4, "item.completed", 1),
            ],
        );
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(next(&mut a).await);
        }
        assert_eq!(got, [(2, true), (3, false), (3, true), (4, false)]);
        assert!(hub.topics.lock().unwrap()[&run].live_waiting.is_empty());
    }

    #[tokio::test]
    async fn a_full_outbox_drops_ephemeral_events_but_keeps_its_watcher_attached() {
        let hub = hub();
        let run = RunId::new();
        let (_stalled, _never_read) = subscribe(&hub, run, 0);
        let big = "x".repeat(BUFFER_BYTES / 2);
        for _ in 0..4 {
            hub.offer_live(&[live(run, 0, &big)]);
        }
        let topics = hub.topics.lock().unwrap();
        assert_eq!(topics[&run].subscribers.len(), 1, "still attached");
        assert_eq!(topics[&run].subscribers[0].cursor, 0);
    }

    #[tokio::test]
    async fn ephemeral_events_waiting_for_the_reader_are_bounded_by_bytes() {
        let hub = hub();
        let run = RunId::new();
        let (_a, _stream) = subscribe(&hub, run, 0);
        // Past the tail, so they wait for the reader: a few large ones fill the budget.
        let big = "x".repeat(BUFFER_BYTES / 2);
        for _ in 0..8 {
            hub.offer_live(&[live(run, 1, &big)]);
        }
        let waiting: usize = hub.topics.lock().unwrap()[&run]
            .live_waiting
            .iter()
            .map(Message::encoded_len)
            .sum();
        assert!(
            waiting <= BUFFER_BYTES,
            "{waiting} bytes wait, more than one watcher's buffer"
        );
        // Small ones still fit after the reader drained the big ones.
        hub.fan_out(run, vec![record(run, 1, "item.started", 1)]);
        hub.offer_live(&[live(run, 2, "small")]);
        assert_eq!(hub.topics.lock().unwrap()[&run].live_waiting.len(), 1);
    }

    #[tokio::test]
    async fn the_last_watcher_leaving_pokes_the_reader() {
        let hub = hub();
        let run = RunId::new();
        let (attachment, _stream) = subscribe(&hub, run, 0);
        let poke = hub.topics.lock().unwrap()[&run].poke.clone();
        drop(attachment);
        let woken = poke.notified();
        tokio::pin!(woken);
        assert!(woken.as_mut().enable(), "the reader was not told");
        assert_eq!(hub.tail_or_close(run), None);
        assert!(hub.topics.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_poll_wakes_only_runs_that_moved() {
        let hub = hub();
        let (moved, still) = (RunId::new(), RunId::new());
        let (_a, _sa) = subscribe(&hub, moved, 5);
        let (_b, _sb) = subscribe(&hub, still, 5);
        hub.wake_moved(&[(moved, 6), (still, 5)]);
        let topics = hub.topics.lock().unwrap();
        let woken = |run: RunId| {
            let notified = topics[&run].poke.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        };
        assert!(woken(moved));
        assert!(!woken(still));
    }
}
