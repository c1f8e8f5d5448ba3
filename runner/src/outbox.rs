//! A run's outgoing events: numbered with the runner-side sequence, kept until the
//! manager acknowledges them (after commit), resent after a reconnect, and bounded so a
//! provider waits instead of the runner growing without limit.
//!
//! Two things keep a run from stalling here. Every event is made to fit the manager's
//! payload limit as it is pushed ([`crate::fit`]), so the outbox never holds an event
//! the manager would refuse; and a push waiting for room gives up as soon as the run is
//! aborted (its lease is gone, so no acknowledgement will ever make room), so the run's
//! task can end. Batches handed to the connection respect the manager's limits on
//! events and bytes ([`BatchLimits`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use agentrun_shared::proto;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::fit::{self, DEFAULT_MAX_PAYLOAD_BYTES, PayloadLimit, StreamedText};
use crate::provider::{EventPayload, ProviderEvent};
use crate::wire::{self, EncodedEvents};

/// A push refused because the run was aborted: nothing more may be written for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the run was aborted")]
pub struct Aborted;

/// How large one `AppendEventsRequest` may be, from the manager's `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most events in one batch.
    pub max_events: usize,
    /// Most payload bytes (`payload_json`) in one batch; a single larger event still
    /// goes, alone.
    pub max_bytes: usize,
}

impl BatchLimits {
    /// The limits a welcome names; a zero (a manager that does not say) takes a default
    /// that fits the manager's defaults.
    pub fn from_welcome(welcome: &proto::Welcome) -> Self {
        let max_events = (welcome.max_batch_events.max(1) as usize).min(10_000);
        let max_bytes = match usize::try_from(welcome.max_batch_bytes) {
            Ok(0) | Err(_) => 4 * DEFAULT_MAX_PAYLOAD_BYTES,
            Ok(bytes) => bytes,
        };
        Self {
            max_events,
            max_bytes,
        }
    }
}

/// Events of one run under one lease epoch.
pub struct Outbox {
    state: Mutex<State>,
    /// Called after each push, to get the event sent.
    on_push: Box<dyn Fn() + Send + Sync>,
    /// Signalled when acknowledgements free space.
    space: Notify,
    capacity: usize,
    /// The manager's payload limit, as its last welcome said.
    limit: PayloadLimit,
    /// The run's abort token: once it fires, pushes fail at once.
    abort: CancellationToken,
    /// Assistant text streamed per item, so an oversized reply says where its text is.
    streamed: Mutex<StreamedText>,
    /// The run stores no deltas (stream mode `final`): a reply too large for its
    /// `item.completed` is sent again as deltas the manager stores.
    replay_large_replies: bool,
}

struct State {
    /// runner_seq the next pushed event gets.
    next_seq: i64,
    /// Unacknowledged events, oldest first.
    unacked: VecDeque<Unacked>,
    /// Highest runner_seq handed to the connection for sending.
    sent_upto: i64,
}

/// An event kept until the manager has it, already encoded as it is sent (see
/// [`crate::wire`]): a send or a resend copies its bytes.
struct Unacked {
    runner_seq: i64,
    /// Its payload's length, for the batch limit on payload bytes.
    payload_bytes: usize,
    entry: Vec<u8>,
}

impl Outbox {
    /// An outbox holding at most `capacity` unacknowledged events, fitting each to
    /// `limit`, and refusing pushes once `abort` fires. `on_push` runs after each push.
    pub fn new(
        capacity: usize,
        limit: PayloadLimit,
        abort: CancellationToken,
        on_push: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                next_seq: 1,
                unacked: VecDeque::new(),
                sent_upto: 0,
            }),
            on_push: Box::new(on_push),
            space: Notify::new(),
            capacity: capacity.max(1),
            limit,
            abort,
            streamed: Mutex::new(StreamedText::default()),
            replay_large_replies: false,
        }
    }

    /// For a run in stream mode `final`, whose deltas the manager does not store: an
    /// `assistant_message` too large for its `item.completed` (marked
    /// `"text_in_deltas": true`) is preceded by its whole text as `assistant_text` deltas
    /// marked `"text_in_deltas": true` too, which the manager stores, so the log keeps
    /// the reply as it does in the other modes.
    pub fn replaying_large_replies(mut self, replay: bool) -> Self {
        self.replay_large_replies = replay;
        self
    }

    /// Adds an event, split or truncated to fit the payload limit (so possibly as
    /// several events); waits while `capacity` events are unacknowledged. Fails, at once
    /// and also while waiting, when the run is aborted.
    pub async fn push(&self, event_type: &str, mut payload: Value) -> Result<(), Aborted> {
        let limit = self.limit.get();
        self.streamed
            .lock()
            .expect("streamed lock")
            .observe(event_type, &mut payload, limit);
        if self.replay_large_replies
            && event_type == "item.completed"
            && payload["text_in_deltas"] == Value::Bool(true)
        {
            let whole = serde_json::json!({"item_id": payload["item_id"],
                "kind": "assistant_text", "delta": payload["text"], "text_in_deltas": true});
            for payload_json in fit::fit("content.delta", whole, limit) {
                self.push_one("content.delta", payload_json).await?;
            }
        }
        for payload_json in fit::fit(event_type, payload, limit) {
            self.push_one(event_type, payload_json).await?;
        }
        Ok(())
    }

    /// Adds a provider's event as [`Outbox::push`] does; a `content.delta` that fits is
    /// written as JSON text from its fields, without a `Value`.
    pub async fn push_event(&self, event: ProviderEvent) -> Result<(), Aborted> {
        let (item_id, kind, delta) = match event.payload {
            EventPayload::Json(payload) => return self.push(event.event_type, payload).await,
            EventPayload::Delta {
                item_id,
                kind,
                delta,
            } => (item_id, kind, delta),
        };
        let payload_json = fit::delta_text(&item_id, kind, &delta);
        if payload_json.len() > self.limit.get() {
            let payload = serde_json::json!({"item_id": &*item_id, "kind": kind, "delta": delta});
            return self.push(event.event_type, payload).await;
        }
        self.streamed
            .lock()
            .expect("streamed lock")
            .count(&item_id, kind, delta.len());
        self.push_one(event.event_type, payload_json).await
    }

    async fn push_one(&self, event_type: &str, payload_json: String) -> Result<(), Aborted> {
        loop {
            let space = self.space.notified();
            if self.abort.is_cancelled() {
                return Err(Aborted);
            }
            {
                let mut state = self.state.lock().expect("outbox lock");
                if state.unacked.len() < self.capacity {
                    let runner_seq = state.next_seq;
                    state.next_seq += 1;
                    state.unacked.push_back(Unacked {
                        runner_seq,
                        payload_bytes: payload_json.len(),
                        entry: wire::event_entry(runner_seq, event_type, &payload_json),
                    });
                    drop(state);
                    (self.on_push)();
                    return Ok(());
                }
            }
            // No acknowledgement comes for an aborted run: stop waiting for one.
            tokio::select! {
                _ = space => {}
                _ = self.abort.cancelled() => return Err(Aborted),
            }
        }
    }

    /// Events not yet handed out for sending, oldest first, as one batch within
    /// `limits` (at least one event if any is unsent), marked as sent.
    pub fn take_unsent(&self, limits: BatchLimits) -> EncodedEvents {
        let mut state = self.state.lock().expect("outbox lock");
        // The unacknowledged events are numbered consecutively, so the first unsent one
        // is found by its number, not by walking past the ones in flight.
        let first_unsent = state.unacked.front().map_or(0, |first| {
            usize::try_from(state.sent_upto + 1 - first.runner_seq).unwrap_or(0)
        });
        let mut bytes = 0;
        let mut batch = EncodedEvents::default();
        let mut last_seq = None;
        for event in state.unacked.range(first_unsent.min(state.unacked.len())..) {
            if batch.len() >= limits.max_events
                || (!batch.is_empty() && bytes + event.payload_bytes > limits.max_bytes)
            {
                break;
            }
            bytes += event.payload_bytes;
            batch.push(&event.entry);
            last_seq = Some(event.runner_seq);
        }
        if let Some(last_seq) = last_seq {
            state.sent_upto = last_seq;
        }
        batch
    }

    pub fn has_unsent(&self) -> bool {
        let state = self.state.lock().expect("outbox lock");
        state
            .unacked
            .back()
            .is_some_and(|e| e.runner_seq > state.sent_upto)
    }

    /// Everything up to `runner_seq` is stored.
    pub fn ack(&self, runner_seq: i64) {
        let mut state = self.state.lock().expect("outbox lock");
        while state
            .unacked
            .front()
            .is_some_and(|e| e.runner_seq <= runner_seq)
        {
            state.unacked.pop_front();
        }
        state.sent_upto = state.sent_upto.max(runner_seq);
        drop(state);
        self.space.notify_waiters();
    }

    /// After a reconnect: the manager has everything up to `runner_seq`; the rest is sent
    /// again.
    pub fn rewind(&self, runner_seq: i64) {
        self.ack(runner_seq);
        let mut state = self.state.lock().expect("outbox lock");
        state.sent_upto = runner_seq;
    }

    /// The runner_seq of the last event pushed (0: none yet).
    pub fn last_pushed(&self) -> i64 {
        self.state.lock().expect("outbox lock").next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn outbox(capacity: usize) -> Outbox {
        Outbox::new(
            capacity,
            PayloadLimit::default(),
            CancellationToken::new(),
            || {},
        )
    }

    fn events(max_events: usize) -> BatchLimits {
        BatchLimits {
            max_events,
            max_bytes: usize::MAX,
        }
    }

    fn seqs(batch: &[proto::RunnerEvent]) -> Vec<i64> {
        batch.iter().map(|e| e.runner_seq).collect()
    }

    #[tokio::test]
    async fn numbers_batches_resends_and_acks() {
        let outbox = outbox(10);
        for i in 0..5 {
            outbox.push("content.delta", json!({"i": i})).await.unwrap();
        }
        assert_eq!(seqs(&outbox.take_unsent(events(3)).decode()), [1, 2, 3]);
        assert_eq!(outbox.take_unsent(events(10)).len(), 2);
        assert!(!outbox.has_unsent());
        outbox.ack(2);
        // Reconnected: the manager had 1..=3; 4 and 5 go again.
        outbox.rewind(3);
        assert_eq!(seqs(&outbox.take_unsent(events(10)).decode()), [4, 5]);
        assert_eq!(outbox.last_pushed(), 5);
    }

    #[tokio::test]
    async fn batches_are_cut_by_payload_bytes_as_well_as_by_count() {
        let outbox = outbox(100);
        // Payloads of exactly 100 bytes each.
        let payload = json!({"delta": "x".repeat(77), "kind": "a"});
        assert_eq!(payload.to_string().len(), 100);
        for _ in 0..7 {
            outbox.push("content.delta", payload.clone()).await.unwrap();
        }
        let limits = BatchLimits {
            max_events: 1_000,
            max_bytes: 250,
        };
        assert_eq!(seqs(&outbox.take_unsent(limits).decode()), [1, 2]);
        assert_eq!(seqs(&outbox.take_unsent(limits).decode()), [3, 4]);
        // The count still applies.
        let both = BatchLimits {
            max_events: 1,
            max_bytes: 250,
        };
        assert_eq!(seqs(&outbox.take_unsent(both).decode()), [5]);
        // An event larger than the byte limit still goes, alone.
        let tiny = BatchLimits {
            max_events: 1_000,
            max_bytes: 10,
        };
        assert_eq!(seqs(&outbox.take_unsent(tiny).decode()), [6]);
        assert_eq!(seqs(&outbox.take_unsent(tiny).decode()), [7]);
        assert!(outbox.take_unsent(tiny).is_empty());
    }

    #[tokio::test]
    async fn a_final_runs_oversized_reply_is_sent_again_as_marked_deltas() {
        let limit = PayloadLimit::default();
        limit.set_from_welcome(2048);
        let outbox =
            Outbox::new(100, limit, CancellationToken::new(), || {}).replaying_large_replies(true);
        let text = "z".repeat(5000);
        let delta = json!({"item_id": "m", "kind": "assistant_text", "delta": text});
        outbox.push("content.delta", delta).await.unwrap();
        let done = json!({"item_id": "m", "kind": "assistant_message", "text": text});
        outbox.push("item.completed", done).await.unwrap();
        let batch = outbox.take_unsent(events(100)).decode();
        let payloads: Vec<Value> = batch
            .iter()
            .map(|e| serde_json::from_str(&e.payload_json).unwrap())
            .collect();
        let replayed: String = payloads
            .iter()
            .filter(|p| p["text_in_deltas"] == true && p.get("delta").is_some())
            .map(|p| p["delta"].as_str().unwrap())
            .collect();
        assert_eq!(replayed, text, "the whole text, again, marked");
        let last = payloads.last().unwrap();
        assert_eq!(batch.last().unwrap().r#type, "item.completed");
        assert_eq!(
            (&last["text_in_deltas"], &last["truncated"]),
            (&json!(true), &json!(true))
        );
        assert!(batch.iter().all(|e| e.payload_json.len() <= 2048));
    }

    #[tokio::test]
    async fn an_oversized_delta_enters_as_several_events_that_fit() {
        let limit = PayloadLimit::default().get();
        let delta = "y".repeat(3 * limit);
        // As a JSON value, and as a provider's delta (written from its fields).
        for as_fields in [false, true] {
            let outbox = outbox(100);
            if as_fields {
                let event = ProviderEvent::delta("i", "assistant_text", delta.clone());
                outbox.push_event(event).await.unwrap();
            } else {
                let payload = json!({"item_id": "i", "kind": "assistant_text", "delta": delta});
                outbox.push("content.delta", payload).await.unwrap();
            }
            let batch = outbox.take_unsent(events(100)).decode();
            assert_eq!(batch.len(), 4);
            assert!(batch.iter().all(|e| e.payload_json.len() <= limit));
            assert!(batch.iter().all(|e| e.r#type == "content.delta"));
            let text: String = batch
                .iter()
                .map(|e| {
                    let p: Value = serde_json::from_str(&e.payload_json).unwrap();
                    p["delta"].as_str().unwrap().to_owned()
                })
                .collect();
            assert_eq!(text, delta);
            assert_eq!(seqs(&batch), [1, 2, 3, 4]);
        }
    }

    #[tokio::test]
    async fn a_providers_delta_that_fits_is_stored_as_its_value_would_be() {
        let outbox = outbox(10);
        let delta = "a \"quoted\"\n\u{1} token";
        let event = ProviderEvent::delta("turn:1", "assistant_text", delta.into());
        outbox.push_event(event.clone()).await.unwrap();
        outbox
            .push("content.delta", event.payload_value())
            .await
            .unwrap();
        let batch = outbox.take_unsent(events(10)).decode();
        assert_eq!(batch[0].payload_json, batch[1].payload_json);
        assert_eq!(seqs(&batch), [1, 2]);
    }

    #[tokio::test]
    async fn a_full_outbox_waits_for_acknowledgements() {
        let outbox = Arc::new(outbox(2));
        outbox.push("a", json!({})).await.unwrap();
        outbox.push("b", json!({})).await.unwrap();
        let pusher = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push("c", json!({})).await }
        });
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished(), "the third event must wait");
        outbox.take_unsent(events(10));
        outbox.ack(1);
        tokio::time::timeout(Duration::from_secs(1), pusher)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn an_abort_ends_a_waiting_push_and_refuses_later_ones() {
        let abort = CancellationToken::new();
        let outbox = Arc::new(Outbox::new(
            1,
            PayloadLimit::default(),
            abort.clone(),
            || {},
        ));
        outbox.push("a", json!({})).await.unwrap();
        let pusher = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.push("b", json!({})).await }
        });
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished(), "the second event must wait");
        abort.cancel();
        let pushed = tokio::time::timeout(Duration::from_secs(10), pusher)
            .await
            .expect("an abort ends the wait")
            .unwrap();
        assert_eq!(pushed, Err(Aborted));
        outbox.ack(1);
        assert_eq!(outbox.push("c", json!({})).await, Err(Aborted));
        assert_eq!(outbox.last_pushed(), 1);
    }
}
