//! Following a run's events live (`WatchRun`), or a session's (`WatchSession`): the
//! per-watcher part.
//!
//! The database is the only source of events. A run watcher reads pages after its
//! cursor until it has caught up, then attaches to its run's topic in the replica's
//! [`super::watch_hub`], which tails the log once for all of the run's watchers here and
//! queues new events into each one's outbox. A watcher whose outbox is full is detached
//! and reads from the database again at its own cursor, then re-attaches; so the seam
//! between replay and live delivery has no gap and no duplicate, and a slow client only
//! slows itself. What a client that stops reading holds is bounded by bytes: one page
//! ([`events::PAGE_BYTES`]) in its task and [`BUFFER_BYTES`] buffered towards it. An idle
//! attached watcher costs the database nothing; the safety-net poll is the hub's, one
//! per replica.
//!
//! A session watcher reads on its own: after each wake-up of the session or its runs
//! (the hub's safety-net poll among them), it reads the session's log after its cursor.
//! An idle one costs nothing.
//!
//! A watcher re-checks the API key it was opened with (see [`super::auth::StreamKey`]):
//! at once when a key is revoked anywhere, and at least every
//! [`super::auth::STREAM_RECHECK_INTERVAL`]; a revoked or expired key ends the stream
//! UNAUTHENTICATED.

use std::pin::Pin;
use std::sync::Arc;

use agentrun_shared::ids::{RunId, SessionId};
use agentrun_shared::proto;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::Status;
use uuid::Uuid;

use super::auth::StreamKey;
use super::watch_hub::Left;
use super::{AppState, convert};
use crate::error::Error;
use crate::limits::Occupied;
use crate::store::sessions::{self, EventCursor};
use crate::store::{Tenant, events, runs};

/// Events read per page (pages are bounded by bytes too, in the store).
const PAGE: i64 = 500;
/// Items buffered towards one client, at most: a page the watcher read itself is an
/// item per event, a fan-out of the hub (a whole append) one item. What the buffer
/// holds is bounded by [`BUFFER_BYTES`] anyway (the channel allocates as it fills).
const BUFFER: usize = 4096;
/// Bytes of events buffered towards one client, at most (one larger event still goes):
/// a few of the largest appends of streamed deltas (`--max-batch-events`), so a watcher
/// that keeps up takes each whole rather than being detached by it.
pub const BUFFER_BYTES: usize = 1024 * 1024;

pub type EventStream = WatchStream<proto::Event>;
pub type SessionEventStream = WatchStream<proto::SessionEvent>;
pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The sending half of a watcher's stream: bounded by [`BUFFER`] queued items and by
/// [`BUFFER_BYTES`]; a message holds its share of the bytes until the server takes it.
/// The watcher's task and the hub share it, one at a time (the hub while attached). The
/// hub queues a fan-out's events as one item, so a streamed reply costs a channel send
/// and a semaphore release per page, not per delta.
pub(super) struct Outbox<T> {
    tx: mpsc::Sender<Queued<T>>,
    room: Arc<Semaphore>,
}

/// One item of a watcher's queue: messages in order, holding their bytes of the room
/// until the server has taken the last of them, or the status that ends the stream.
enum Queued<T> {
    Messages(Vec<T>, OwnedSemaphorePermit),
    End(Status),
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            room: self.room.clone(),
        }
    }
}

/// What came of [`Outbox::try_send`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TrySend {
    Sent,
    /// No room now: nothing was queued.
    Full,
    /// The client went away.
    Closed,
}

/// The bytes of the room `message` takes (one larger than the whole buffer takes all of
/// it, and still goes).
pub(super) fn room_for(message: &impl Message) -> usize {
    message.encoded_len().clamp(1, BUFFER_BYTES)
}

impl<T: Message + Unpin + Send + 'static> Outbox<T> {
    pub(super) fn new() -> (Self, WatchStream<T>) {
        let (tx, rx) = mpsc::channel(BUFFER);
        let stream = Receiving {
            rx,
            current: Vec::new().into_iter(),
            room: None,
        };
        let room = Arc::new(Semaphore::new(BUFFER_BYTES));
        (Self { tx, room }, Box::pin(stream))
    }

    /// Waits for room, then queues `message`; `Err` when the client went away.
    async fn send(&self, message: T) -> Result<(), ()> {
        let bytes = room_for(&message) as u32;
        let Ok(room) = self.room.clone().acquire_many_owned(bytes).await else {
            return Err(());
        };
        let queued = Queued::Messages(vec![message], room);
        self.tx.send(queued).await.map_err(|_| ())
    }

    /// Bytes of room free now: messages within it are taken by [`Outbox::try_send_all`]
    /// (the hub is the only sender while the watcher is attached, and room only grows
    /// meanwhile).
    pub(super) fn room_now(&self) -> usize {
        self.room.available_permits()
    }

    /// Queues `message` if there is room now, without waiting.
    pub(super) fn try_send(&self, message: T) -> TrySend {
        let bytes = room_for(&message);
        self.try_send_all(vec![message], bytes)
    }

    /// Queues `messages`, taking `bytes` of room (what [`room_for`] gives them
    /// together), all or none, without waiting.
    pub(super) fn try_send_all(&self, messages: Vec<T>, bytes: usize) -> TrySend {
        let room = u32::try_from(bytes)
            .ok()
            .and_then(|bytes| self.room.clone().try_acquire_many_owned(bytes).ok());
        let Some(room) = room else {
            return TrySend::Full;
        };
        match self.tx.try_send(Queued::Messages(messages, room)) {
            Ok(()) => TrySend::Sent,
            Err(mpsc::error::TrySendError::Full(_)) => TrySend::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => TrySend::Closed,
        }
    }

    /// Ends the stream with `status`.
    async fn fail(&self, status: Status) {
        let _ = self.tx.send(Queued::End(status)).await;
    }

    async fn closed(&self) {
        self.tx.closed().await
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving half of a watcher's stream: the queued messages one by one, giving a
/// fan-out's room back once its last message is taken. (A plain stream, not a chain of
/// combinators: each layer moved every message once more.)
struct Receiving<T> {
    rx: mpsc::Receiver<Queued<T>>,
    current: std::vec::IntoIter<T>,
    room: Option<OwnedSemaphorePermit>,
}

impl<T: Unpin> Stream for Receiving<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = this.current.next() {
                if this.current.len() == 0 {
                    this.room = None;
                }
                return std::task::Poll::Ready(Some(Ok(message)));
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Queued::Messages(messages, room)) => {
                    // Nothing to take (never queued, but harmless): its room goes back now.
                    this.room = (!messages.is_empty()).then_some(room);
                    this.current = messages.into_iter();
                }
                Some(Queued::End(status)) => return std::task::Poll::Ready(Some(Err(status))),
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// A place among the tenant's open watchers on this replica, held while the watcher runs.
fn watcher_place(state: &AppState, tenant: &Tenant) -> Result<Occupied<Tenant>, Error> {
    let most = state.settings.quotas().tenant_watchers;
    state.watchers.enter(tenant, most).ok_or_else(|| {
        Error::ResourceExhausted(format!(
            "the tenant has {most} open watchers on this manager, the most it may have \
             (--tenant-max-watchers); close one first"
        ))
    })
}

/// Starts following `run_id` after `after_seq`. The stream ends after `run.terminal`.
pub async fn watch_run(
    state: &AppState,
    tenant: &Tenant,
    key: Option<Uuid>,
    run_id: RunId,
    after_seq: i64,
) -> Result<EventStream, Error> {
    {
        let client = state.pool.get().await?;
        runs::position(&client, tenant, run_id).await?;
    }
    let place = watcher_place(state, tenant)?;
    let (tx, stream) = Outbox::new();
    let state = state.clone();
    let tenant = tenant.clone();
    // Tracked: shutdown ends watchers and waits for them.
    state.tasks.clone().spawn(async move {
        let _watching = (state.metrics.watching(), place);
        let key = StreamKey::new(key, &state.notifier);
        if let Err(err) = follow(&state, &tenant, key, run_id, after_seq, &tx).await {
            tx.fail(err.into()).await;
        }
    });
    Ok(stream)
}

async fn follow(
    state: &AppState,
    tenant: &Tenant,
    mut key: StreamKey,
    run_id: RunId,
    mut cursor: i64,
    tx: &Outbox<proto::Event>,
) -> Result<(), Error> {
    loop {
        // Catch up from the database at our own cursor.
        key.check_if_due(&state.auth, &state.notifier).await?;
        let (page, run) = {
            let client = state.pool.get().await?;
            let page = events::list(&client, run_id, cursor, PAGE).await?;
            let run = if (page.len() as i64) < PAGE {
                Some(runs::position(&client, tenant, run_id).await?)
            } else {
                None
            };
            (page, run)
        };
        let full = page.len() as i64 == PAGE;
        let mut ids = convert::WireIds::default();
        for event in page {
            let (seq, ended) = (event.seq, event.event_type == "run.terminal");
            if tx.send(ids.event(event)).await.is_err() {
                return Ok(()); // the client went away
            }
            cursor = seq;
            if ended {
                return Ok(());
            }
        }
        // Caught up with a run that has ended (the client resumed after its end).
        if let Some(run) = run
            && run.status.is_terminal()
            && cursor >= run.last_event_seq
        {
            return Ok(());
        }
        if full {
            continue;
        }
        if tx.is_closed() {
            return Ok(());
        }
        if state.shutdown.is_cancelled() {
            return Err(shutting_down());
        }
        // Caught up: live events come from the hub. `None`: its reader is already past
        // us, so we read again.
        let Some(mut attached) = state.watch_hub.attach(run_id, cursor, tx) else {
            continue;
        };
        loop {
            tokio::select! {
                left = attached.left() => match left {
                    Left::Behind { cursor: at } => {
                        cursor = at;
                        break;
                    }
                    Left::Ended => return Ok(()),
                },
                _ = key.due() => key.check(&state.auth, &state.notifier).await?,
                _ = tx.closed() => return Ok(()),
                _ = state.shutdown.cancelled() => return Err(shutting_down()),
            }
        }
    }
}

fn shutting_down() -> Error {
    Error::Unavailable("the manager is shutting down; resume with after_seq".into())
}

/// Starts following a session: the events of all its runs after `after`, then live ones,
/// until the client goes away (a session has no end).
pub async fn watch_session(
    state: &AppState,
    tenant: &Tenant,
    key: Option<Uuid>,
    session_id: SessionId,
    output_only: bool,
    after: EventCursor,
) -> Result<SessionEventStream, Error> {
    {
        let client = state.pool.get().await?;
        sessions::get(&client, tenant, session_id, "").await?;
    }
    let place = watcher_place(state, tenant)?;
    let (tx, stream) = Outbox::new();
    let state = state.clone();
    let tenant = tenant.clone();
    // Tracked: shutdown ends watchers and waits for them.
    state.tasks.clone().spawn(async move {
        let _watching = (state.metrics.watching(), place);
        let key = StreamKey::new(key, &state.notifier);
        if let Err(err) =
            follow_session(&state, &tenant, key, session_id, output_only, after, &tx).await
        {
            tx.fail(err.into()).await;
        }
    });
    Ok(stream)
}

async fn follow_session(
    state: &AppState,
    tenant: &Tenant,
    mut key: StreamKey,
    session_id: SessionId,
    output_only: bool,
    mut cursor: EventCursor,
    tx: &Outbox<proto::SessionEvent>,
) -> Result<(), Error> {
    // New runs of the session are announced on the session's own key, and so is what
    // the replica's safety-net poll finds.
    let mut session_woken = state.notifier.watch(session_id.0);
    let _polled = state.watch_hub.watch_session(tenant.clone(), session_id);
    loop {
        key.check_if_due(&state.auth, &state.notifier).await?;
        session_woken.borrow_and_update();
        let (page, view) = {
            let client = state.pool.get().await?;
            let view = sessions::get(&client, tenant, session_id, "").await?;
            let page =
                sessions::list_events(&client, tenant, session_id, output_only, cursor, PAGE)
                    .await?;
            (page, view)
        };
        // Subscribed before the wait below, after the read: a wake-up in between is kept.
        let mut run_woken = [view.session.active_run_id, view.session.last_run_id]
            .into_iter()
            .flatten()
            .map(|run| state.notifier.watch(run.0))
            .collect::<Vec<_>>();
        let full = page.len() as i64 == PAGE;
        for event in page {
            let next = EventCursor {
                run_id: Some(event.run_id),
                seq: event.seq,
            };
            let message = proto::SessionEvent {
                event: Some(convert::event(event)),
                session_version: view.session.version,
            };
            if tx.send(message).await.is_err() {
                return Ok(());
            }
            cursor = next;
        }
        if full {
            continue;
        }
        let runs_changed = async {
            match run_woken.as_mut_slice() {
                [] => std::future::pending().await,
                [one] => drop(one.changed().await),
                [one, two, ..] => {
                    tokio::select! { _ = one.changed() => {}, _ = two.changed() => {} }
                }
            }
        };
        tokio::select! {
            _ = session_woken.changed() => {}
            _ = runs_changed => {}
            _ = key.due() => {}
            _ = tx.closed() => return Ok(()),
            _ = state.shutdown.cancelled() => {
                tx.fail(Status::unavailable("the manager is shutting down; resume from your cursor")).await;
                return Ok(());
            }
        }
    }
}
